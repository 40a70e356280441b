"""``mnq-search report`` end to end on a small tree: a real run (random DeiT-Tiny weights, a few
Fashion-MNIST images), two QAT folders, a study table and an Optuna SQLite export written here.
Every plot is a real PNG of sensible size, the HTML embeds every plot and table, absent inputs are
named on the page, bad input exits 2 with one line, and headless Chromium renders the page."""

from __future__ import annotations

import base64
import csv
import json
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from mnq_search.cli import main
from mnq_search.io import save_weights
from mnq_search.methods import NONLINEAR_METHODS
from mnq_search.report import pick_slots
from mnq_search.report._qat import top1_per_epoch
from mnq_search.zoo import create_zoo_model

FAST = ["--calib-size", "8", "--eval-size", "8", "--batch-size", "8", "--quiet"]
MODEL = "fmnist-deit-tiny"
CHROMIUM = Path("/usr/bin/chromium")
QAT_STRATEGIES = {"sqnr_diff": 2.0, "uniform:ivit": 0.0}  # strategy -> ASQNR offset of its fake curve


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _write_qat(folder: Path, strategy: str, slot_ops: dict[str, str], offset: float) -> None:
    folder.mkdir(parents=True)
    history = ["epoch,step,loss,top1,images_per_s"]
    for epoch in (1, 2, 3):
        history.append(f"{epoch},{epoch * 10 - 5},1.0,{40 + epoch + offset},900")  # a mid-epoch evaluation
        history.append(f"{epoch},{epoch * 10},0.9,{50 + 10 * epoch + offset},1000")
    (folder / "history.csv").write_text("\n".join(history) + "\n")
    (folder / "slot_asqnr.csv").write_text("slot,op,asqnr_out\n" + "".join(
        f"{s},{op},{30 - 0.3 * i + offset}\n" for i, (s, op) in enumerate(slot_ops.items())))
    counts = {"softmax": {"ibert": 12, "fqvit": 0, "ivit": 0}, "gelu": {"ibert": 0, "ivit": 12},
              "layernorm": {"ibert": 5, "fqvit": 0, "ivit": 20}}
    (folder / "result.json").write_text(json.dumps({"strategy": strategy, "model": MODEL, "bits": 8,
                                                    "counts": counts, "top1_ptq": 50.0, "top1_qat": 80.0 + offset}))


STUDY_ROWS = [(MODEL, 8, "sqnr_diff", 1, 71.0), (MODEL, 8, "sqnr_diff", 1, 73.0), (MODEL, 6, "uniform:ivit", 1, 60.5),
              ("fmnist-vit-small", 8, "sqnr_diff", 1, 75.25)]


def _write_study(folder: Path) -> None:
    folder.mkdir(parents=True)
    rows = "".join(f"{m},{b},{s},{e},{t},99.0,12.5\n" for m, b, s, e, t in STUDY_ROWS)
    (folder / "results.csv").write_text("model,bits,strategy,qat_epochs,top1,top5,seconds\n" + rows)


def _write_optuna(db: Path, slot_ops: dict[str, str]) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db.parent.mkdir(parents=True)
    slots = [s for s in slot_ops if slot_ops[s] != "layernorm"][:6]
    choices = {"softmax": ["ibert", "fqvit", "ivit"], "gelu": ["ibert", "ivit"]}
    score = {"ibert": 1.0, "fqvit": 0.5, "ivit": 2.0}

    def objective(trial):
        picks = [trial.suggest_categorical(s, choices[slot_ops[s]]) for s in slots]
        top1 = 60 + sum(score[m] * (i + 1) for i, m in enumerate(picks))
        return top1 if len(trial.study.directions) == 1 else (top1, sum(m == "ibert" for m in picks))

    url = f"sqlite:///{db}"
    single = optuna.create_study(storage=url, study_name="joint", direction="maximize",
                                 sampler=optuna.samplers.RandomSampler(seed=0))
    single.optimize(objective, n_trials=8)
    multi = optuna.create_study(storage=url, study_name="joint-mo", directions=["maximize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        multi.set_metric_names(["top1", "ibert slots"])
    multi.optimize(objective, n_trials=8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these tests run beside other jobs on 2 cores, where two OpenMP threads that
    spin-wait for each other stall (measured: a calibration pass 0.4 s alone, 18 s beside a training job)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tree(tmp_path_factory, one_thread) -> Path:
    """run-sqnr_diff/ (a real run), qat/<strategy>/, study/results.csv, optuna/study.db."""
    root = tmp_path_factory.mktemp("tree")
    torch.manual_seed(0)
    ckpt = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_weights(create_zoo_model(MODEL), ckpt)
    assert main(["run", "--strategy", "sqnr_diff", "--checkpoint", str(ckpt), "--out", str(root / "run-sqnr_diff"),
                 *FAST]) == 0
    slot_ops = {r["slot"]: r["op"] for r in read_csv(root / "run-sqnr_diff" / "sensitivity.csv")}
    for strategy, offset in QAT_STRATEGIES.items():
        _write_qat(root / "qat" / strategy.replace(":", "-"), strategy, slot_ops, offset)
    _write_study(root / "study")
    _write_optuna(root / "optuna" / "study.db", slot_ops)
    return root


@pytest.fixture(scope="module")
def report(tree) -> Path:
    assert main(["report", str(tree), "--images", "2", "--quiet"]) == 0
    return tree / "report"


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def sensitivity_rows(tree: Path) -> list[dict]:
    return read_csv(tree / "run-sqnr_diff" / "sensitivity.csv")


EXPECTED_PLOTS = [
    f"fig1_{MODEL}_8bit", f"fig2_{MODEL}_8bit", f"fig3_{MODEL}_8bit", f"fig4_{MODEL}_8bit",
    "optuna_study_joint_history", "optuna_study_joint_importance",
    "optuna_study_joint-mo_history_0", "optuna_study_joint-mo_history_1", "optuna_study_joint-mo_importance_0",
    "optuna_study_joint-mo_importance_1", "optuna_study_joint-mo_pareto",
]


def test_every_plot_is_a_sensible_png(report):
    assert sorted(p.stem for p in report.glob("*.png")) == sorted(EXPECTED_PLOTS)
    for stem in EXPECTED_PLOTS:
        path = report / f"{stem}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", stem
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            width, height = im.size
            colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
        assert 500 <= width <= 3000 and 350 <= height <= 3000, (stem, im.size)
        assert path.stat().st_size > 10_000, stem
        assert len(colours) > 20, stem  # something was drawn


def test_html_embeds_every_plot_and_table(report):
    page = (report / "index.html").read_text()
    for stem in EXPECTED_PLOTS:
        png = (report / f"{stem}.png").read_bytes()
        pattern = rf'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="[^"]*" data-file="{re.escape(stem)}.png">'
        tag = re.search(pattern, page)
        assert tag is not None, stem
        assert base64.b64decode(tag.group(1)) == png, stem
    assert re.findall(r'src="([a-z]+):', page) == ["data"] * len(EXPECTED_PLOTS)  # no external resource
    assert '<table id="table3">' in page and '<table id="table4">' in page
    for name in ("table3_counts.csv", "table3_counts.md", "table4_top1.csv", "table4_top1.md"):
        assert (report / name).is_file() and f'href="{name}"' in page
    # the paper's inputs are all in this tree (no low-bit run: the bits and oscillation sections say so),
    # and the single-objective study has no Pareto front
    assert re.findall(r"Skipped: ([^<]*)", page) == ["no assignment file with per-layer bits (layer_bits) found",
                                                      "no QAT folder with oscillation.csv found",
                                                      "optuna/study.db · joint: single objective, no Pareto front"]


def test_slots_are_labelled_as_in_the_paper_and_matplotlib_is_left_alone(report, tree):
    import matplotlib

    page = (report / "index.html").read_text()
    key = page.split("<summary>slot key and values</summary>")[1].split("</details>")[0]
    rows = re.findall(r"<tr><td>([^<]+)</td><td>([^<]+)</td><td>([^<]+)</td>", key)
    assert [r[:2] for r in rows[:4]] == [("1.layernorm", "blocks.0.norm1"), ("2.softmax", "blocks.0.attn.softmax"),
                                         ("3.layernorm", "blocks.0.norm2"), ("4.gelu", "blocks.0.mlp.act")]
    assert rows[-1][:2] == ("49.layernorm", "norm") and len(rows) == 49
    chosen = json.loads((tree / "run-sqnr_diff" / "assignment.json").read_text())["slots"]
    assert {slot: method for _, slot, method in rows} == chosen
    assert matplotlib.rcParams["axes.facecolor"] == "white"  # Optuna's ggplot style stayed inside its plots


def test_table3_counts_each_run(report, tree):
    rows = {r["folder"]: r for r in read_csv(report / "table3_counts.csv")}
    assert set(rows) == {"run-sqnr_diff", "qat/sqnr_diff", "qat/uniform-ivit"}
    counts = json.loads((tree / "run-sqnr_diff" / "result.json").read_text())["counts"]
    for op, methods in counts.items():
        for method, n in methods.items():
            assert int(rows["run-sqnr_diff"][f"{op}.{method}"]) == n
    assert rows["qat/sqnr_diff"]["gelu.ivit"] == "12" and "gelu.fqvit" not in rows["qat/sqnr_diff"]
    markdown = (report / "table3_counts.md").read_text()
    assert "| Softmax I-BERT | Softmax FQ-ViT | Softmax I-ViT | Softmax IndexSoftmax | GELU I-BERT | GELU I-ViT |" in markdown


def test_table4_top1_per_strategy_and_bits(report, tree):
    rows = {(r["strategy"], r["bits"], r["qat_epochs"]): r for r in read_csv(report / "table4_top1.csv")}
    result = json.loads((tree / "run-sqnr_diff" / "result.json").read_text())
    assert float(rows[("full precision", "32", "0")][MODEL]) == pytest.approx(result["top1_fp"])
    assert float(rows[("sqnr_diff", "8", "0")][MODEL]) == pytest.approx((result["top1_quant"] + 50.0) / 2)  # run + PTQ
    # QAT folders (3 epochs, final top-1) and the study (1 epoch; two sqnr_diff rows averaged)
    assert float(rows[("sqnr_diff", "8", "3")][MODEL]) == pytest.approx(82.0)
    assert float(rows[("uniform:ivit", "8", "3")][MODEL]) == pytest.approx(80.0)
    assert float(rows[("sqnr_diff", "8", "1")][MODEL]) == pytest.approx(72.0)
    assert float(rows[("sqnr_diff", "8", "1")]["fmnist-vit-small"]) == pytest.approx(75.25)
    assert rows[("uniform:ivit", "6", "1")]["fmnist-vit-small"] == ""
    assert list(rows)[0] == ("full precision", "32", "0")
    assert "| sqnr_diff | 8 | 1 | 72.00 (n=2) | 75.25 |" in (report / "table4_top1.md").read_text()


def test_table4_labels_per_layer_bits_and_qat_recipe_variants(tmp_path):
    """A W3A3 QAT cell (every layer recorded at 3 bits under the model-wide 4) is a 3-bit row, each
    VVTQ recipe variant of one assignment is its own QAT row, and their shared PTQ top-1 counts once."""
    from mnq_search.report._inputs import Folder, Inputs
    from mnq_search.report._tables import table4, top1_records

    layers = {"patch_embed.proj": [3, 3], "blocks.0.attn.qkv": [3, 3], "head": [3, 3]}
    folders = []
    for name, qat, top1 in (("plain", {"recipe": "vvtq", "multicrop": 0, "vvtq_lsq": False, "vvtq_strength": 0.0}, 71.0),
                            ("full", {"recipe": "vvtq", "multicrop": 4, "vvtq_lsq": True, "vvtq_strength": 0.01}, 70.1),
                            ("freeze", {"recipe": "vvtq", "vvtq_freeze": 0.02}, 70.5)):
        f = Folder(tmp_path / "w3a3" / name, f"w3a3/{name}",
                   result={"strategy": "uniform:index", "model": MODEL, "bits": 4, "top1_ptq": 54.14, "top1_qat": top1,
                           "qat": {"epochs": 3, **qat}, "layer_bits": {"layers": layers, "bops_per_image": 1.0}})
        assert f.bits == 3 and f.is_qat
        folders.append(f)
    assert [f.qat_variant for f in folders] == ["", "multicrop+lsq+reg", "freeze"]
    rows = {tuple(r[:3]): r[3] for r in table4(top1_records(Inputs(tmp_path, folders=folders))).rows}
    assert rows == {("uniform:index", 3, 3): (71.0, 1), ("uniform:index (QAT +multicrop+lsq+reg)", 3, 3): (70.1, 1),
                    ("uniform:index (QAT +freeze)", 3, 3): (70.5, 1), ("uniform:index", 3, 0): (54.14, 1)}
    # the model-wide bits stay when the record mixes widths or weight and activation bits differ, and an
    # assignment's layer_bits (possibly a few layers, possibly Softmax/GELU slots) is never read for it
    for record in ({"a": [8, 8], "b": [6, 6]}, {"a": [4, 8]}, {"a": [True, True]}, {}):
        assert Folder(tmp_path / "m", "m", result={"bits": 8, "layer_bits": {"layers": record}}).bits == 8
    partial = Folder(tmp_path / "p", "p", result={"bits": 4}, assignment={"layer_bits": {"head": 8}})
    assert partial.bits == 4


def test_figure2_shows_the_slots_where_methods_disagree_most(report, tree):
    rows = sensitivity_rows(tree)
    page = (report / "index.html").read_text()
    table = page.split('<table class="fig2">')[1].split("</table>")[0]
    shown = re.findall(r"<tr><td>[^<]*</td><td>([^<]+)</td><td>([^<]+)</td><td>([^<]+)</td>", table)
    expected = [(r["slot"], r["method"], f"{float(r['sqnr_diff']):.2f}") for s in pick_slots(rows)
                for r in rows if r["slot"] == s]
    assert shown == expected and len(pick_slots(rows)) == 4


def test_slots_option_picks_the_histogram_slots(tree, tmp_path, capsys):
    gelu = next(r["slot"] for r in sensitivity_rows(tree) if r["op"] == "gelu")
    code, out, err = run_cli(["report", tree / "run-sqnr_diff", "--slots", gelu, "--images", "1", "--quiet",
                              "--out", tmp_path / "r"], capsys)
    assert code == 0, err
    table = (tmp_path / "r" / "index.html").read_text().split('<table class="fig2">')[1].split("</table>")[0]
    assert re.findall(r"<tr><td>[^<]*</td><td>([^<]+)</td><td>([^<]+)</td>", table) == [(gelu, m) for m in NONLINEAR_METHODS["gelu"]]
    assert "wrote " in out and (tmp_path / "r" / f"fig2_{MODEL}_8bit.png").is_file()


def test_unloadable_model_skips_figure2_with_a_note(tree, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tree / "run-sqnr_diff", run)
    result = json.loads((run / "result.json").read_text())
    result["config"]["checkpoint"] = result["checkpoint"] = str(tmp_path / "gone.safetensors")
    (run / "result.json").write_text(json.dumps(result))
    code, out, err = run_cli(["report", run, "--quiet"], capsys)
    assert code == 0, err
    page = (run / "report" / "index.html").read_text()
    assert "Skipped: run: cannot re-run the model (checkpoint not found" in page
    assert "skipped: run: cannot re-run the model" in out
    assert (run / "report" / f"fig1_{MODEL}_8bit.png").is_file() and not list((run / "report").glob("fig2*"))


def test_absent_inputs_are_named_on_the_page(tmp_path, capsys):
    _write_study(tmp_path / "study")
    code, out, err = run_cli(["report", tmp_path / "study"], capsys)
    assert code == 0, err
    page = (tmp_path / "study" / "report" / "index.html").read_text()
    for reason in ("no sensitivity.csv found", "no QAT folder with slot_asqnr.csv found",
                   "no QAT folder with history.csv found", "no Optuna SQLite storage", "Table 3: nothing to tabulate"):
        assert f"Skipped: {reason}" in page, reason
    assert '<table id="table4">' in page and "<img" not in page
    assert not (tmp_path / "study" / "report" / "table3_counts.csv").exists()


def test_unreadable_inputs_are_skipped_with_a_note_and_left_untouched(tmp_path, capsys):
    import sqlite3

    _write_study(tmp_path / "study")
    with sqlite3.connect(tmp_path / "other.db") as con:
        con.execute("CREATE TABLE notes (text TEXT)")
    con.close()
    before = (tmp_path / "other.db").read_bytes()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "result.json").write_text("{oops")
    (tmp_path / "bad" / "sensitivity.csv").write_text("slot,op\nblocks.0.norm1,layernorm\n")
    code, out, err = run_cli(["report", tmp_path], capsys)
    assert code == 0, err
    page = (tmp_path / "report" / "index.html").read_text()
    assert "skipped bad/result.json: not valid JSON" in page
    assert "skipped bad/sensitivity.csv: no column method, asqnr_in, asqnr_out, sqnr_diff" in page
    assert "Skipped: other.db: not a readable Optuna storage" in page
    assert (tmp_path / "other.db").read_bytes() == before


def test_bad_input_exits_2_with_one_line_and_writes_nothing(tree, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("nothing to plot")
    (tmp_path / "file.txt").write_text("x")
    run = tree / "run-sqnr_diff"
    cases = {
        "missing folder": ([tmp_path / "nope"], "no such folder"),
        "empty folder": ([tmp_path / "empty"], "is empty"),
        "a file": ([tmp_path / "file.txt"], "is a file; report reads a folder"),
        "nothing known": ([tmp_path / "other"], "nothing to report"),
        "no images": ([run, "--images", "0"], "--images must be positive"),
        "unknown slot": ([run, "--slots", "blocks.0.attn.softmx"], "did you mean 'blocks.0.attn.softmax'"),
        "empty slots": ([run, "--slots", ","], "--slots needs at least one slot name"),
        "slots without sensitivity": ([tree / "study", "--slots", "blocks.0.attn.softmax"], "needs a run folder"),
    }
    for name, (args, needle) in cases.items():
        out_dir = tmp_path / f"out-{name.replace(' ', '_')}"
        code, _, err = run_cli(["report", *args, "--out", out_dir], capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("mnq-search: error: "), (name, err)
        assert needle in lines[0], (name, lines[0])
        assert not out_dir.exists(), name


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs /usr/bin/chromium (Debian: chromium, chromium-driver)")
def test_page_renders_in_headless_chromium(report, tmp_path):
    shot = tmp_path / "shot.png"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
           (report / "index.html").resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1200, 2000)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 22)
    assert len(colours) > 200  # text and embedded plots, not a blank page
    white = max(n for n, c in colours if c == (255, 255, 255)) if any(c == (255, 255, 255) for _, c in colours) else 0
    assert white < 0.97 * 1200 * 2000


def test_helpers_pick_the_largest_spread_and_the_last_evaluation_per_epoch():
    rows = [dict(slot=s, sqnr_diff=d) for s, ds in (("a", (0, 1)), ("b", (0, 9)), ("c", (5, 5)), ("d", (-3, 3)))
            for d in ds]
    assert pick_slots(rows, 2) == ["b", "d"]  # forward order, not spread order
    history = [dict(epoch=1.0, top1=10.0), dict(epoch=1.0, top1=20.0), dict(epoch=2.0, top1=None),
               dict(epoch=2.0, top1=30.0)]
    assert top1_per_epoch(history) == ([1.0, 2.0], [20.0, 30.0])


def test_bits_heat_map_and_oscillation_plots(tmp_path):
    from mnq_search.report import make_report
    from mnq_search.report._lowbit import bits_grid

    layer_bits = {f"blocks.{i}.{k}": b for i in range(3) for k, b in
                  (("attn.qkv", 8), ("attn.proj", 6), ("mlp.fc1", 5), ("mlp.fc2", 4))}
    layer_bits.update({"patch_embed.proj": 8, "head": "w8a6", "blocks.2.mlp.fc2": "w4a8"})
    rows, cols, grid = bits_grid(layer_bits)
    assert bits_grid(layer_bits, part=1)[2][2, 3] == 8 and grid[2, 3] == 4  # "wXaY": weights, then inputs
    assert rows == ["blocks.0", "blocks.1", "blocks.2", "other"]
    assert cols[:4] == ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"] and grid[1, 3] == 4 and grid[3, 4] == 8
    assert int(torch.isnan(torch.from_numpy(grid)).sum()) == 4 + 2 * 3  # the other row and the block rows' gaps
    run = tmp_path / "tree" / "mixqvit"
    run.mkdir(parents=True)
    (run / "assignment.json").write_text(json.dumps({"model": MODEL, "bits": 6, "strategy": "mixqvit",
                                                     "slots": {}, "layer_bits": layer_bits}))
    qat = tmp_path / "tree" / "vvtq"
    qat.mkdir()
    (qat / "history.csv").write_text("epoch,step,loss,top1,images_per_s,osc_rate\n1,4,1.0,50.0,10,0.02\n"
                                     "2,8,0.9,55.0,10,0.01\n")
    (qat / "oscillation.csv").write_text("epoch,layer,rate,mean_frequency,frozen\n" + "".join(
        f"{e},blocks.{i}.mlp.fc1,{0.03 / e},0.001,0\n{e},blocks.{i}.attn.qkv,{0.02 / e},0.001,0\n"
        for e in (1, 2) for i in range(3)))
    rep = make_report(tmp_path / "tree", histograms=False)
    names = sorted(p.name for p in rep.plots)
    assert names == ["bits_mixqvit.png", "fig4_model.png", "oscillation_vvtq.png"]  # fig4: the history's top-1
    for p in rep.plots:
        with Image.open(p) as im:
            im.verify()
        assert p.stat().st_size > 5_000
    page = rep.index.read_text()
    assert "Bits per layer, mixqvit" in page and "4 bits: 2, 5 bits: 3, 6 bits: 3, 8 bits: 4, w4a8 bits: 1, w8a6 bits: 1" in page
    assert "Oscillation rate, vvtq" in page
