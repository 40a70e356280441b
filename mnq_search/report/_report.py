"""``mnq-search report DIR``: every figure and table of the paper that DIR's files allow, as PNGs,
CSV and Markdown tables, and one self-contained ``index.html``.

What is absent is skipped, and the page says why; only a missing or empty DIR (or a bad option)
is an error.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError
from ..io import atomic_write_text
from ._histograms import DEFAULT_SLOT_COUNT, check_slots, collect_outputs, pick_slots, plot_histograms
from ._html import Plot, Section, render_page
from ._inputs import Folder, Inputs, find_inputs
from ._lowbit import plot_bits_heatmap, plot_oscillation, read_oscillation
from ._optuna import optuna_plots
from ._qat import group_by_model, group_title, plot_qat_asqnr, plot_top1_history
from ._sensitivity import plot_sensitivity, sensitivity_labels, sensitivity_slots
from ._style import method_title, save_png, slug
from ._tables import Table, table3, table4, to_csv, to_html, to_markdown, top1_records

DEFAULT_IMAGES = 64
LOOKED_FOR = "result.json, sensitivity.csv, history.csv, slot_asqnr.csv, results.csv or a SQLite study.db"


@dataclass
class Report:
    """What :func:`make_report` wrote."""

    out: Path
    index: Path
    plots: list[Path] = field(default_factory=list)
    tables: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


@dataclass
class _Context:
    inputs: Inputs
    out: Path
    slots: list[str] | None
    images: int
    histograms: bool
    device: str
    progress: bool
    used: set[str] = field(default_factory=set)

    def png(self, *parts: object) -> Path:
        """A fresh PNG path in the report folder (``_2``, ``_3`` added on a repeated name)."""
        base = slug(*parts)
        name, k = base, 1
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return self.out / f"{name}.png"


def make_report(directory: str | Path, out: str | Path | None = None, slots: Sequence[str] | None = None,
                images: int = DEFAULT_IMAGES, histograms: bool = True, device: str | None = None,
                progress: bool = False) -> Report:
    """Write the report of everything under ``directory`` into ``out`` (default ``directory/report``).

    Args:
        directory: a run, QAT, study or Optuna-export folder (searched recursively).
        out: the report folder.
        slots: the slots of Figure 2 (default: the ones where methods disagree most).
        images: calibration images re-run for Figure 2's histograms.
        histograms: False skips Figure 2 (no model is loaded).
        device: for Figure 2 (default: cuda when available).
        progress: show progress bars while Figure 2 calibrates.

    Returns:
        A :class:`Report` naming the files written.

    >>> from mnq_search.report import make_report
    >>> make_report("runs/default").index   # doctest: +SKIP
    PosixPath('runs/default/report/index.html')
    """
    from ..pipeline import default_device

    root, out_dir, inputs = _validated(directory, out, slots, images)
    ctx = _Context(inputs, out_dir, list(slots) if slots else None, images, histograms,
                   device or default_device(), progress)
    sets = _sensitivity_sets(inputs.folders)
    sections = [_figure1(ctx, sets), _figure2(ctx, sets), _figure3(ctx), _figure4(ctx), _layer_bits(ctx),
                _oscillation(ctx), _optuna(ctx)]
    tables, table_files = _tables(ctx)
    sections.append(tables)
    index = out_dir / "index.html"
    atomic_write_text(index, render_page(f"mnq-search report: {root.name}", sections,
                                         _inputs_list(inputs), inputs.notes))
    return Report(out_dir, index, [p.path for s in sections for p in s.plots], table_files,
                  [x for s in sections for x in s.skipped] + inputs.notes)


def _validated(directory: str | Path, out: str | Path | None, slots: Sequence[str] | None,
               images: int) -> tuple[Path, Path, Inputs]:
    """Check every input, then create the report folder: (root, report folder, inputs found)."""
    root = _check_directory(directory)
    if images <= 0:
        raise UsageError(f"--images must be positive, got {images}")
    out_dir = Path(out) if out is not None else root / "report"
    inputs = find_inputs(root, exclude=out_dir)
    if not inputs:
        raise UsageError(f"nothing to report in {directory}: found no {LOOKED_FOR}")
    _check_requested_slots(slots, inputs)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot write the report to {out_dir}: {exc.strerror or exc}") from None
    return root, out_dir, inputs


def _check_directory(directory: str | Path) -> Path:
    root = Path(directory)
    if not root.exists():
        raise UsageError(f"no such folder: {directory}")
    if not root.is_dir():
        raise UsageError(f"{directory} is a file; report reads a folder (run, qat, study or Optuna export)")
    if not any(root.iterdir()):
        raise UsageError(f"folder {directory} is empty")
    return root.resolve()


def _check_requested_slots(slots: Sequence[str] | None, inputs: Inputs) -> None:
    if not slots:
        return
    known = list(dict.fromkeys(str(r["slot"]) for f in inputs.folders for r in f.sensitivity or []))
    if not known:
        raise UsageError("--slots needs a run folder with sensitivity.csv under DIR")
    check_slots(slots, known)


def _sensitivity_sets(folders: Sequence[Folder]) -> list[list[Folder]]:
    """Folders grouped by identical ``sensitivity.csv`` (strategies run on the same measurement)."""
    sets: dict[str, list[Folder]] = {}
    for f in folders:
        if f.sensitivity:
            sets.setdefault(f.sensitivity_hash or f.rel, []).append(f)
    return list(sets.values())


def _tag(model: str, bits: int | None) -> tuple[str, str | None]:
    """File-name parts of a (model, bits) group: ``fig1_fmnist-deit-tiny_8bit.png``."""
    return model, (f"{bits}bit" if bits is not None else None)


def _set_title(group: Sequence[Folder]) -> str:
    return group_title((group[0].model, group[0].bits))


def _figure1(ctx: _Context, sets: list[list[Folder]]) -> Section:
    section = Section("Figure 1: layer-wise sensitivity", "Per slot, each method's SQNR diff (bars) and output "
                      "ASQNR (lines), one panel per op: the paper's Figure 1. Slots are labelled N.op, N the "
                      "position among all non-linear layers in forward order.")
    for group in sets:
        rows = group[0].sensitivity
        fig = plot_sensitivity(rows, _set_title(group))
        path = save_png(fig, ctx.png("fig1", *_tag(group[0].model, group[0].bits)))
        used_by = ", ".join(f"{f.label} ({f.strategy})" for f in group)
        section.plots.append(Plot(path, f"Sensitivity, {_set_title(group)}", f"From sensitivity.csv of {used_by}.",
                                  _slot_key_html(rows, group[0].chosen)))
    if not sets:
        section.skipped.append("no sensitivity.csv found (a sqnr_* strategy measures it; run --sensitivity forces it)")
    return section


def _slot_key_html(rows: list[dict], chosen: dict[str, str]) -> str:
    labels = sensitivity_labels(rows)
    slots, slot_ops = sensitivity_slots(rows)
    methods = list(dict.fromkeys(str(r["method"]) for r in rows))
    diff = {(r["slot"], r["method"]): r["sqnr_diff"] for r in rows}
    head = "".join(f"<th>SQNR diff {html.escape(method_title(m))}</th>" for m in methods)
    body = "".join(
        f"<tr><td>{html.escape(labels[s])}</td><td>{html.escape(s)}</td><td>{html.escape(chosen.get(s, '—'))}</td>"
        + "".join(f"<td>{diff[(s, m)]:.2f}</td>" if (s, m) in diff else "<td>—</td>" for m in methods) + "</tr>"
        for s in slots)
    return (f"<details><summary>slot key and values</summary><table><thead><tr><th>label</th><th>slot</th>"
            f"<th>chosen</th>{head}</tr></thead><tbody>{body}</tbody></table></details>")


def _figure2(ctx: _Context, sets: list[list[Folder]]) -> Section:
    section = Section("Figure 2: output histograms", "Float (Output X) against quantized (Output QX) outputs of "
                      "chosen slots, one panel per method, with the slot's SQNR diff: the paper's Figure 2. "
                      f"Default slots: the {DEFAULT_SLOT_COUNT} where the methods' SQNR diffs spread most.")
    if not ctx.histograms:
        section.skipped.append("--no-histograms")
        return section
    for group in sets:
        _figure2_for(ctx, group, section)
    if not sets:
        section.skipped.append("no sensitivity.csv found, so no SQNR diff to show")
    return section


def _figure2_for(ctx: _Context, group: list[Folder], section: Section) -> None:
    folder = next((f for f in group if f.result), None)
    if folder is None:
        section.skipped.append(f"{group[0].label}: no result.json describing the model to re-run")
        return
    rows = folder.sensitivity
    known = sensitivity_slots(rows)[0]
    slots = [s for s in ctx.slots if s in known] if ctx.slots else pick_slots(rows)
    if not slots:
        section.skipped.append(f"{folder.label}: none of --slots is a slot of this model")
        return
    try:
        outputs = collect_outputs(folder.result, slots, ctx.images, ctx.device, ctx.progress)
    except UsageError as exc:
        section.skipped.append(f"{folder.label}: cannot re-run the model ({exc})")
        return
    diffs = {(r["slot"], r["method"]): float(r["sqnr_diff"]) for r in rows}
    labels = sensitivity_labels(rows)
    fig = plot_histograms(outputs, diffs, labels, folder.chosen, _set_title(group))
    path = save_png(fig, ctx.png("fig2", *_tag(folder.model, folder.bits)))
    section.plots.append(Plot(path, f"Output histograms, {_set_title(group)}",
                              f"{ctx.images} calibration images re-run from {folder.label}; SQNR diff from its "
                              "sensitivity.csv.", _histogram_values_html(slots, labels, diffs, folder.chosen)))


def _histogram_values_html(slots, labels, diffs, chosen) -> str:
    body = "".join(f"<tr><td>{html.escape(labels.get(s, s))}</td><td>{html.escape(s)}</td><td>{html.escape(m)}</td>"
                   f"<td>{d:.2f}</td><td>{'yes' if chosen.get(s) == m else ''}</td></tr>"
                   for s in slots for (slot, m), d in diffs.items() if slot == s)
    return ("<table class=\"fig2\"><thead><tr><th>label</th><th>slot</th><th>method</th><th>SQNR diff (dB)</th>"
            f"<th>chosen</th></tr></thead><tbody>{body}</tbody></table>")


def _qat_figure(ctx: _Context, section: Section, tag: str, has, plot, caption: str, missing: str) -> Section:
    """One plot per (model, bits) over the QAT folders that have the file ``has`` selects."""
    for key, folders in group_by_model(ctx.inputs.folders, has).items():
        path = save_png(plot(folders, group_title(key)), ctx.png(tag, *_tag(*key)))
        section.plots.append(Plot(path, f"{caption}, {group_title(key)}", "From " + ", ".join(f.label for f in folders) + "."))
    if not section.plots:
        section.skipped.append(missing)
    return section


def _figure3(ctx: _Context) -> Section:
    section = Section("Figure 3: output ASQNR after QAT", "Per slot, the output ASQNR after QAT of every strategy "
                      "run on the same model and bits (slot_asqnr.csv): the paper's Figure 3; sqnr_diff in red.")
    return _qat_figure(ctx, section, "fig3", lambda f: f.slot_asqnr, plot_qat_asqnr, "ASQNR after QAT",
                       "no QAT folder with slot_asqnr.csv found")


def _figure4(ctx: _Context) -> Section:
    section = Section("Figure 4: QAT training curves", "Top-1 after each QAT epoch, one line per strategy "
                      "(history.csv): the paper's Figure 4; sqnr_diff in red.")
    return _qat_figure(ctx, section, "fig4", lambda f: f.history, plot_top1_history, "Top-1 per epoch",
                       "no QAT folder with history.csv found")


def _layer_bits(ctx: _Context) -> Section:
    section = Section("Bit-widths per layer", "The bit-width (weights and inputs) of every weight layer of runs "
                      "that allocate them (mixqvit, joint bits search), and of the Softmax and GELU slots when "
                      "their bits were searched: rows are blocks, columns the block's layers.")
    for f in ctx.inputs.folders:
        bits = (f.assignment or {}).get("layer_bits")
        if isinstance(bits, dict) and bits:
            path = save_png(plot_bits_heatmap(bits, f"{f.label}: {f.strategy}"), ctx.png("bits", f.label))
            hist = {b: list(bits.values()).count(b) for b in sorted(set(bits.values()), key=str)}
            section.plots.append(Plot(path, f"Bits per layer, {f.label}",
                                      "Layers (and slots) per bit-width: " + ", ".join(f"{b} bits: {n}" for b, n in hist.items()) + "."))
    if not section.plots:
        section.skipped.append("no assignment file with per-layer bits (layer_bits) found")
    return section


def _oscillation(ctx: _Context) -> Section:
    section = Section("Weight oscillation during QAT", "Per epoch, the fraction of each layer's weights whose integer "
                      "moved up then down or down then up (oscillation.csv of --qat-recipe vvtq runs), mean per "
                      "layer kind, and the weight-weighted mean over all layers.")
    for f in ctx.inputs.folders:
        path = f.path / "oscillation.csv"
        if not path.is_file():
            continue
        overall = [(int(h["epoch"]), float(h["osc_rate"])) for h in f.history or [] if h.get("osc_rate") not in (None, "")]
        png = save_png(plot_oscillation(read_oscillation(path), overall, f"{f.label}: {f.strategy}"),
                       ctx.png("oscillation", f.label))
        section.plots.append(Plot(png, f"Oscillation rate, {f.label}", "From oscillation.csv and history.csv."))
    if not section.plots:
        section.skipped.append("no QAT folder with oscillation.csv found")
    return section


def _optuna(ctx: _Context) -> Section:
    section = Section("Optuna studies", "Optimization history, importance of each slot's method, and the Pareto "
                      "front of multi-objective studies, drawn by optuna.visualization.matplotlib.")
    for db in ctx.inputs.optuna:
        for plot in optuna_plots(db, ctx.inputs.rel(db), ctx.out, section.skipped):
            ctx.used.add(plot.path.stem)
            section.plots.append(plot)
    if not ctx.inputs.optuna:
        section.skipped.append("no Optuna SQLite storage (study.db) found")
    return section


def _tables(ctx: _Context) -> tuple[Section, list[Path]]:
    section = Section("Tables 3 and 4", "Slots per op and method of each run (the paper's Table 3) and top-1 per "
                      "strategy and bit-width (Table 4); also written as CSV and Markdown.")
    files: list[Path] = []
    for table, stem, table_id in ((table3(ctx.inputs.folders), "table3_counts", "table3"),
                                  (table4(top1_records(ctx.inputs)), "table4_top1", "table4")):
        if not table.rows:
            section.skipped.append(f"{table.title.split(':')[0]}: nothing to tabulate")
            continue
        files += _write_table(table, ctx.out / stem)
        section.tables.append(to_html(table, table_id) + f'<p class="inputs">Files: <a href="{stem}.csv">{stem}.csv'
                              f'</a>, <a href="{stem}.md">{stem}.md</a></p>')
    return section, files


def _write_table(table: Table, stem: Path) -> list[Path]:
    csv_path, md_path = stem.with_suffix(".csv"), stem.with_suffix(".md")
    atomic_write_text(csv_path, to_csv(table))
    atomic_write_text(md_path, to_markdown(table))
    return [csv_path, md_path]


def _inputs_list(inputs: Inputs) -> list[str]:
    out = []
    for f in inputs.folders:
        kinds = [n for n, v in (("result", f.result), ("assignment", f.assignment), ("sensitivity", f.sensitivity),
                                ("history", f.history), ("slot ASQNR", f.slot_asqnr)) if v]
        out.append(f"{f.label}: {'QAT' if f.is_qat else 'run'} folder ({', '.join(kinds)})")
    out += [f"{rel}: study table ({len(rows)} rows)" for rel, rows in inputs.studies]
    out += [f"{inputs.rel(db)}: Optuna storage" for db in inputs.optuna]
    return out
