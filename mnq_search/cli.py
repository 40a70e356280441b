"""``mnq-search``: quantize a ViT to integers and choose a non-linear method per layer.

Every known error prints one line (``mnq-search: error: ...``) and exits with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from .errors import UsageError
from .runtime import EVAL_BATCH, keep_freed_memory

EXAMPLES = """examples:
  mnq-search run --strategy sqnr_diff                  # embedded Fashion-MNIST DeiT-Tiny, 8 bits
  mnq-search run --strategy uniform:ivit --bits 6 --out runs/ivit6
  mnq-search run --model deit_tiny_patch16_224 --checkpoint deit_tiny.pth --data imagefolder:/data/imagenet
  mnq-search eval --assignment runs/default/assignment.json
  mnq-search run --strategy optuna --objective qat,cost --n-trials 40 --out runs/optuna
  mnq-search list strategies
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints the whole usage)
        raise UsageError(message)


def _eval_size(text: str) -> int | None:
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an image count or 'all', got {text!r}") from None


def _add_recipe_args(g) -> None:
    g.add_argument("--qat-recipe", default="plain", choices=("plain", "vvtq"),
                   help="QAT recipe (--qat-epochs and the qat objective too): plain, or vvtq (oscillation tracking "
                        "and the variation-aware regulariser) (default: plain)")
    g.add_argument("--vvtq-strength", type=float, default=0.01, help="vvtq: the regulariser's final strength (default: 0.01)")
    g.add_argument("--vvtq-freeze", type=float, default=None,
                   help="vvtq: freeze weights whose EMA oscillation frequency exceeds this (default: no freezing)")
    g.add_argument("--vvtq-lsq", action="store_true",
                   help="vvtq: learn the weight steps (LSQ) per head for qkv weights, per channel elsewhere")
    g.add_argument("--multicrop", type=int, default=0, metavar="K",
                   help="multi-crop distillation: K random-resized crops per training image, the float teacher run "
                        "once per crop and its top-k soft labels cached; QAT trains on them (default: 0, off)")
    g.add_argument("--multicrop-top-k", type=int, default=5, help="soft-label classes kept per crop (default: 5)")
    g.add_argument("--multicrop-cache", default=None, metavar="FILE",
                   help="soft-label cache file (.pt/.npz) to reuse or write (default: <out>/soft_labels.pt for qat)")


def _qat_recipe(args) -> dict:
    return dict(recipe=args.qat_recipe, vvtq_strength=args.vvtq_strength, vvtq_freeze=args.vvtq_freeze,
                vvtq_lsq=args.vvtq_lsq,
                multicrop=args.multicrop, multicrop_top_k=args.multicrop_top_k, multicrop_cache=args.multicrop_cache)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None,
                   help="zoo name (mnq-search list models) or timm name (default: fmnist-deit-tiny)")
    g.add_argument("--checkpoint", default=None, help="local weights: safetensors or torch state dict (default: the zoo's)")
    g.add_argument("--num-classes", type=int, default=None,
                   help="outputs of the classifier (default: as many as the checkpoint's classifier has)")
    g.add_argument("--data", default=None,
                   help="fmnist, fmnist:PATH or imagefolder:PATH (default: the model's own data set)")
    g.add_argument("--download", action="store_true", help="let torchvision download Fashion-MNIST if missing")


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantization and evaluation")
    g.add_argument("--bits", type=int, default=8, help="weight/activation bit-width, 4..8 (default: 8)")
    g.add_argument("--nl-bits", type=int, default=None,
                   help="bit-width of the Softmax/GELU inputs and methods, 4..8 (default: --bits; eval/qat: the file's)")
    g.add_argument("--families", default=None, metavar="NAMES",
                   help="method families offered to every slot, comma-separated (default: every registered one)")
    g.add_argument("--val-size", type=int, default=1000,
                   help="validation images that strategies and objectives selecting on validation use (default: 1000)")
    g.add_argument("--fine-grid", action="store_true", default=None,
                   help="exp/erf kernels on a grid no coarser than 2**-6, an exact left shift "
                        "(default: off, the references' numerics; eval/qat: as the assignment file says)")
    g.add_argument("--post-ln", default=None, choices=("tensor", "channel"),
                   help="inputs of qkv and fc1: 'tensor' (one scale) or 'channel' (Mix-QViT clipped channel-wise "
                        "ranges folded into the LayerNorm and the linear, RepQ-ViT style; eval/qat: the file's)")
    g.add_argument("--calib-size", type=int, default=128, help="calibration images from the train split (default: 128)")
    g.add_argument("--eval-size", type=_eval_size, default=2000,
                   help="evaluation images: a fixed seeded subset of the test split, or 'all' (default: 2000)")
    g.add_argument("--batch-size", type=int, default=EVAL_BATCH,
                   help=f"evaluation and calibration batch size (default: {EVAL_BATCH})")
    g.add_argument("--seed", type=int, default=0, help="seed of calibration subset and strategies (default: 0)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


SEARCH_FLAGS = ("objective", "n_trials", "timeout", "n_jobs", "sampler", "pruner", "storage", "study", "warm_start",
                "qat_steps", "qat_holdout", "qat_eval_every", "cost_table", "heartbeat", "grace", "max_retry")


def _add_search_args(p: argparse.ArgumentParser) -> None:
    from .search import SearchOptions as D
    from .search import list_pruners, list_samplers

    g = p.add_argument_group("search", "joint search (--strategy optuna): a study in --storage; workers that name "
                                       "the same --storage and --study share it")
    g.add_argument("--objective", metavar="NAMES", default=None,
                   help="objective (mnq-search list objectives), or two comma-separated for a Pareto study, "
                        f"e.g. qat,cost (default: {','.join(D.objectives)})")
    g.add_argument("--n-trials", metavar="N", type=int, default=None,
                   help=f"trials the study finishes (complete or pruned), all workers together (default: {D.n_trials})")
    g.add_argument("--timeout", metavar="S", type=float, default=None, help="seconds this worker searches at most (default: no limit)")
    g.add_argument("--n-jobs", metavar="N", type=int, default=None, help=f"trials run in parallel threads by this worker (default: {D.n_jobs})")
    g.add_argument("--sampler", choices=list_samplers(), default=None, help=f"Optuna sampler, seeded by --seed (default: {D.sampler})")
    g.add_argument("--pruner", choices=list_pruners(), default=None,
                   help=f"stops bad trials early from the qat objective's intermediate top-1 (default: {D.pruner})")
    g.add_argument("--storage", metavar="URL", default=None,
                   help="Optuna storage: sqlite:///FILE, postgresql+psycopg2://USER@HOST:PORT/DB or journal:FILE "
                        "(default: sqlite:///OUT/study.db)")
    g.add_argument("--study", metavar="NAME", default=None, help="study name (default: OBJECTIVES-BITSbit, e.g. proxy-8bit)")
    g.add_argument("--warm-start", metavar="NAMES", default=None,
                   help="strategies or assignment files (*.json, e.g. a run's assignment.json) whose assignments are "
                        "the first trials, comma-separated, or none (default: every uniform and greedy strategy)")
    g.add_argument("--qat-steps", metavar="N", type=int, default=None, help=f"QAT steps per trial of the qat objective (default: {D.qat_steps})")
    g.add_argument("--qat-holdout", metavar="N", type=int, default=None,
                   help=f"validation images the qat objective's top-1 is measured on (default: {D.qat_holdout})")
    g.add_argument("--qat-eval-every", metavar="N", type=int, default=None,
                   help="evaluate and report to the pruner every N QAT steps (default: per epoch and at the end)")
    g.add_argument("--cost-table", metavar="FILE", default=None,
                   help="JSON file overriding the cost objective's weights or per-method counts (default: the families' declared counts)")
    g.add_argument("--heartbeat", metavar="S", type=int, default=None,
                   help=f"seconds between heartbeats of a running trial (SQL storages) (default: {D.heartbeat})")
    g.add_argument("--grace", metavar="S", type=int, default=None,
                   help="seconds without heartbeat after which a trial's worker counts as dead and the trial is "
                        "retried (default: 2 x --heartbeat)")
    g.add_argument("--max-retry", metavar="N", type=int, default=None,
                   help=f"times a dead worker's trial is retried (default: {D.max_retry})")
    g.add_argument("--sensitivity-cache", default=None, metavar="CSV",
                   help="sensitivity table: read if the file exists, else measured and written there, so the "
                        "workers of a study measure it once (default: measured by every run)")


def build_parser() -> argparse.ArgumentParser:
    from .context import RunSettings as RunConfig

    parser = _Parser(prog="mnq-search", description=__doc__.splitlines()[0], epilog=EXAMPLES,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("run", help="choose a method per slot with a strategy and evaluate it",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategy", default=RunConfig.strategy,
                   help="strategy name (mnq-search list strategies) (default: sqnr_output)")
    p.add_argument("--out", default=RunConfig.out, help="output folder (default: runs/default)")
    p.add_argument("--asqnr-form", default="amplitude", choices=("amplitude", "eq10"),
                   help="ASQNR form: per-sample amplitude ratio, or the paper's Eq. 10 as printed (default: amplitude)")
    p.add_argument("--sensitivity", action="store_true",
                   help="measure the sensitivity table even when the strategy does not need it")
    p.add_argument("--qat-epochs", type=int, default=0, help="QAT epochs after the assignment (default: 0, PTQ only)")
    _add_recipe_args(p)
    p.add_argument("--groups", default="1", metavar="SPEC",
                   help="input quantizers of the block linears and attention probabilities (IGQ-ViT): 1 per tensor, "
                        "G instance-aware groups, channel (static per channel), or alloc:G (group counts allocated "
                        "on validation under the BOPs of G groups) (default: 1)")
    g = p.add_argument_group("bit-widths per layer (--strategy mixqvit)")
    g.add_argument("--budget", default=None, metavar="BUDGET",
                   help="BOPs budget: a uniform setting like w6a6 or a count like 1.2G (required by mixqvit)")
    g.add_argument("--search-bits", default="4,5,6,8", metavar="BITS",
                   help="candidate bit-widths per weight layer (2..8), weights and activations together, or pairs "
                        "with separate input bits like w4a8,w6a6,w8a8 (default: 4,5,6,8)")
    g.add_argument("--importance", default="none", choices=("none", "lrp", "hessian"),
                   help="layer importance that weighs the sensitivity: none, LRP relevance, or HAWQ Hessian "
                        "trace (default: none)")
    g.add_argument("--bit-sensitivity-cache", default=None, metavar="FILE",
                   help="mixqvit: read the per-layer bit sensitivity from FILE when it was measured for the same "
                        "settings, else measure it and write FILE (share it across budgets and importances)")
    g.add_argument("--joint-bits", action="store_true",
                   help="optuna/random: search a bit-width per weight layer (from --search-bits) with the methods; "
                        "with --objective proxy,bops --sampler nsga2, an accuracy x BOPs Pareto front")
    for what, flag, default, metavar, effect in (
            ("an instance-aware group count per group layer", "groups", "1,2,4,8,16", "COUNTS",
             "the bops objective counts the groups' overhead, --budget w4a4g8 is the BOPs of 8 groups everywhere"),
            ("a bit-width per Softmax and GELU slot (4..8)", "nl-bits", "6,8", "BITS",
             "the bops objective then counts the attention products, whose probabilities take the Softmax "
             "slot's bits")):
        g.add_argument(f"--joint-{flag}", action="store_true",
                       help=f"optuna/random: search {what} (from --search-{flag}) with the methods; {effect}")
        g.add_argument(f"--search-{flag}", default=default, metavar=metavar,
                       help=f"candidates with --joint-{flag} (default: {default})")
    _add_model_args(p)
    _add_quant_args(p)
    _add_search_args(p)

    p = sub.add_parser("eval", help="calibrate and evaluate a given assignment")
    p.add_argument("--assignment", required=True, help="assignment JSON (from run)")
    p.add_argument("--results-file", default=None, help="append the result as a CSV row to this file")
    _add_model_args(p)
    _add_quant_args(p)
    p.set_defaults(bits=None)

    p = sub.add_parser("qat", help="quantization-aware training of an assignment (torchrun for many GPUs)")
    p.add_argument("--assignment", required=True, help="assignment JSON (from run)")
    g = p.add_argument_group("training")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=None, help="epochs (default: 1)")
    length.add_argument("--steps", type=int, default=None, help="optimizer steps instead of epochs")
    g.add_argument("--lr", type=float, default=5e-5, help="peak learning rate, AdamW (default: 5e-5)")
    g.add_argument("--qat-batch-size", type=int, default=128, help="global training batch (default: 128)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default: 1e-4)")
    g.add_argument("--distill", action="store_true", help="distil from the float model (logits KL)")
    _add_recipe_args(g)
    g.add_argument("--resume", default=None, help="continue the run in this folder from its last checkpoint")
    g.add_argument("--out", default=None, help="output folder (default: the --resume folder, else runs/qat)")
    _add_model_args(p)
    _add_quant_args(p)
    p.set_defaults(bits=None)

    p = sub.add_parser("study", help="run a study spec (TOML) to one tidy CSV and a Markdown table")
    p.add_argument("action", choices=("run", "tables"), help="run the unfinished cells, or only rebuild the tables")
    p.add_argument("spec", help="study spec, e.g. studies/paper_tables_cpu_mini.toml")
    p.add_argument("--models", default=None, metavar="M1,M2",
                   help="run only these models of the spec, comma-separated (default: all; a model without "
                        "weights yet can wait while the others run); with 'tables': tabulate only theirs, "
                        "as NAME_MODEL... files")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("pretrain", help="train a zoo model from scratch by its seeded recipe")
    p.add_argument("name", help="zoo model (mnq-search list models)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the recipe's)")
    p.add_argument("--out", default=None, help="output folder (default: runs/pretrain-NAME)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--data", default=None, help="fmnist:PATH for a Fashion-MNIST folder (default: fmnist)")
    p.add_argument("--no-resume", action="store_true", help="start over even if a training state exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("report", help="the paper's figures and tables, as PNG, CSV, Markdown and one HTML page",
                       epilog=REPORT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", metavar="DIR", help="a run, qat, study or Optuna-export folder, searched recursively")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="report folder (default: DIR/report)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g = p.add_argument_group("Figure 2: output histograms (re-runs the run's model)")
    g.add_argument("--slots", default=None,
                   help="comma-separated slot names (default: the 4 slots whose methods' SQNR diffs spread most)")
    g.add_argument("--images", type=int, default=64, help="calibration images to re-run (default: 64)")
    g.add_argument("--no-histograms", action="store_true", help="skip Figure 2, load no model (default: draw it)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")

    p = sub.add_parser("export", help="a study's trials as CSV, or a comparison CSV of the runs in a folder",
                       epilog=EXPORT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--storage", default=None, help="Optuna storage URL or file of the study (as for run --storage)")
    src.add_argument("--compare", default=None, metavar="DIR",
                     help="folder of runs (result.json at any depth): one row per run, by model, bits and strategy")
    p.add_argument("--study", default=None, help="study name, with --storage (default: the storage's only study)")
    p.add_argument("--csv", required=True, metavar="FILE", help="the CSV file to write")

    p = sub.add_parser("dashboard", help="optuna-dashboard for a study storage on 127.0.0.1; prints its address")
    p.add_argument("--storage", required=True, help="Optuna storage URL or file (as for run --storage)")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1, 0 for a free one (default: 0)")

    p = sub.add_parser("list", help="list strategies, objectives, methods or models")
    p.add_argument("what", choices=("strategies", "objectives", "methods", "models"))
    return parser


def _print_run_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"{result['model']} · {result['bits']}-bit · strategy {result['strategy']}")
    from .methods import list_families

    table.add_column("op")
    methods = list(list_families())
    for m in methods:
        table.add_column(m, justify="right")
    for op, row in result["counts"].items():
        table.add_row(op, *[str(row.get(m, "-")) if m in row else "-" for m in methods])
    console.print(table)
    n = result["eval_images"]
    subset = "all test images" if result["eval_size"] == "all" else f"a fixed seeded subset of {n} test images"
    console.print(f"top-1 FP {result['top1_fp']:.2f} %   quantized {result['top1_quant']:.2f} %   "
                  f"({subset}; {result['calib_images']} calibration images; {result['wall_time_s']:.1f} s)")


def _settings(args, **extra) -> "RunSettings":
    """The typed settings of run / eval / qat from the parsed flags (checked by ``validate``)."""
    from .context import RunSettings

    return RunSettings(model=args.model, checkpoint=args.checkpoint, num_classes=args.num_classes, data=args.data,
                       download=args.download, bits=args.bits if args.bits is not None else 8, nl_bits=args.nl_bits,
                       val_size=args.val_size,
                       families=tuple(f.strip() for f in args.families.split(",") if f.strip()) if args.families else None,
                       fine_grid=bool(args.fine_grid), post_ln=args.post_ln or "tensor",
                       calib_size=args.calib_size, eval_size=args.eval_size,
                       batch_size=args.batch_size, seed=args.seed, device=args.device, progress=not args.quiet,
                       **extra)


def _run_qat_config(args):
    """The QAT settings of run (--qat-epochs, the qat objective): None (the defaults) unless a recipe is asked."""
    if (args.qat_recipe == "plain" and args.vvtq_strength == 0.01 and args.vvtq_freeze is None
            and not args.vvtq_lsq and not args.multicrop and args.multicrop_cache is None):
        return None
    from .qat import QATConfig

    return QATConfig(**_qat_recipe(args))


def _search_bits(text: str) -> tuple:
    """``--search-bits`` as (weight, activation) pairs, parsed without torch."""
    from .budget import parse_search_bits

    return parse_search_bits(text)


def _search_groups(text: str, flag: str = "--search-groups") -> tuple:
    """``--search-groups`` (or another flag of comma-separated integers) as sorted numbers, parsed without torch."""
    try:
        return tuple(sorted({int(v) for v in text.split(",")}))
    except ValueError:
        raise UsageError(f"{flag}: expected comma-separated integers like {'1,2,4,8' if flag == '--search-groups' else '6,8'}, "
                         f"got {text!r}") from None


def _search_options(args):
    """The search group's flags as typed options (None when none is given and the strategy is not
    optuna)."""
    given = {k: getattr(args, k) for k in SEARCH_FLAGS if getattr(args, k) is not None}
    if args.strategy.partition(":")[0] != "optuna":
        if given:
            flag = "--" + next(iter(given)).replace("_", "-")
            raise UsageError(f"{flag} applies only to --strategy optuna")
        return None
    from .search import SearchOptions

    if "objective" in given:
        given["objectives"] = given.pop("objective")
    return SearchOptions.from_dict(given)


def _cmd_run(args) -> int:
    from .preflight import check_checkpoint, check_data_spec, check_output_dir, check_output_file, check_storage

    # the checks that need no model, before the heavy imports (torch, the model code)
    check_output_dir(args.out)
    search = _search_options(args)
    if args.storage:
        check_storage(args.storage)
    if args.sensitivity_cache:
        check_output_file(args.sensitivity_cache, "--sensitivity-cache")
    if args.bit_sensitivity_cache:
        check_output_file(args.bit_sensitivity_cache, "--bit-sensitivity-cache")
    if args.checkpoint:
        check_checkpoint(args.checkpoint)
    check_data_spec(args.data, getattr(args, "download", False))
    from .groups import parse_groups

    parse_groups(args.groups)
    from .pipeline import preflight_run, run

    settings = _settings(args, strategy=args.strategy, out=args.out, asqnr_form=args.asqnr_form,
                         sensitivity=args.sensitivity, qat_epochs=args.qat_epochs,
                         sensitivity_cache=args.sensitivity_cache, search=search, groups=args.groups,
                         budget=args.budget, search_bits=_search_bits(args.search_bits), importance=args.importance,
                         bit_sensitivity_cache=args.bit_sensitivity_cache,
                         joint_bits=args.joint_bits, joint_groups=args.joint_groups,
                         search_groups=_search_groups(args.search_groups), joint_nl_bits=args.joint_nl_bits,
                         search_nl_bits=_search_groups(args.search_nl_bits, "--search-nl-bits"),
                         qat=_run_qat_config(args))
    preflight_run(settings)
    result = run(settings)
    _print_run_table(result)
    search = result.get("search")
    if search and "study" in search:
        best = "  ".join(f"{m} {v}" for m, v in search["best"]["values"].items())
        print(f"study {search['study']} in {search['storage']}: trials {search['trials']}; best trial "
              f"{search['best']['number']}: {best}")
    elif search and "kl" in search:
        print(f"validation KL {search['kl']:.5g} nats per image on {search['val_images']} validation images "
              f"({search['evaluations']} assignments scored, {search['seconds']:.0f} s)")
    print("wrote " + ", ".join(os.path.join(args.out, f) for f in result["files"]))
    return 0


def _cmd_eval(args) -> int:
    from .preflight import (check_assignment_slots, check_checkpoint, check_data_spec, check_input_file,
                            check_output_file)

    check_input_file(args.assignment, "--assignment")
    if args.results_file:
        check_output_file(args.results_file, "--results-file")
    if args.checkpoint:
        check_checkpoint(args.checkpoint)
        check_assignment_slots(args.assignment, args.checkpoint)
    check_data_spec(args.data, getattr(args, "download", False))
    from .pipeline import evaluate_assignment

    res = evaluate_assignment(args.assignment, _settings(args), args.results_file,
                              bits_given=args.bits is not None, fine_grid_given=args.fine_grid is not None)
    print(f"{res['model']} {res['bits']}-bit {res['assignment']}: top-1 {res['top1']:.2f} %  "
          f"top-5 {res['top5']:.2f} %  ({res['images']} images, {res['seconds']:.1f} s)")
    return 0


def _cmd_qat(args) -> int:
    from .preflight import check_checkpoint, check_data_spec, check_input_file

    check_input_file(args.assignment, "--assignment")
    if getattr(args, "checkpoint", None):
        check_checkpoint(args.checkpoint)
    check_data_spec(getattr(args, "data", None), getattr(args, "download", False))
    from .pipeline import qat_job
    from .qat import QATConfig

    qcfg = QATConfig(epochs=args.epochs or 1, steps=args.steps, lr=args.lr, batch_size=args.qat_batch_size,
                     weight_decay=args.weight_decay, distill=args.distill, seed=args.seed, **_qat_recipe(args))
    res = qat_job(args.assignment, _settings(args), qcfg, args.out, args.resume,
                  bits_given=args.bits is not None, fine_grid_given=args.fine_grid is not None)
    if res:
        print(f"{res['model']} {res['bits']}-bit: top-1 PTQ {res['top1_ptq']:.2f} % -> QAT {res['top1_qat']:.2f} % "
              f"({len(res['history'])} evaluations, {res['qat_seconds']:.0f} s); wrote {res['out']}")
    return 0


def _cmd_study(args) -> int:
    from .study import run_study, tables_of

    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models is not None else None
    if args.action == "run":
        path = run_study(args.spec, progress=not args.quiet, device=args.device, models=models)
    else:
        path = tables_of(args.spec, models)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


def _cmd_pretrain(args) -> int:
    from .pipeline import default_device
    from .pretrain import pretrain
    from .zoo import get_zoo_entry

    get_zoo_entry(args.name)
    if args.epochs is not None and args.epochs <= 0:
        raise UsageError(f"--epochs must be positive, got {args.epochs}")
    data_path = None
    if args.data:
        kind, _, data_path = args.data.partition(":")
        if kind != "fmnist":
            raise UsageError("pretrain supports --data fmnist or fmnist:PATH")
    rec = pretrain(args.name, args.out or f"runs/pretrain-{args.name}", args.epochs, args.device or default_device(),
                   data_path or None, resume=not args.no_resume, quiet=args.quiet)
    print(f"{args.name}: test top-1 {rec['top1']:.2f} % after {rec['epochs']} epochs ({rec['seconds']:.0f} s on {rec['device']})")
    return 0


REPORT_EXAMPLES = """examples:
  mnq-search report runs/default                       # Figures 1-2 and Tables 3-4 of one run
  mnq-search report studies/strategies --no-histograms --out /tmp/report
  mnq-search report runs/default --slots blocks.5.attn.softmax,blocks.11.attn.softmax --images 128
"""


def _cmd_report(args) -> int:
    from .report import make_report

    slots = None
    if args.slots is not None:
        slots = [s.strip() for s in args.slots.split(",") if s.strip()]
        if not slots:
            raise UsageError("--slots needs at least one slot name, e.g. --slots blocks.0.attn.softmax")
    report = make_report(args.dir, args.out, slots, args.images, not args.no_histograms, args.device,
                         progress=not args.quiet)
    for reason in report.skipped:
        print(f"skipped: {reason}")
    print(f"wrote {report.index} ({len(report.plots)} plots, {len(report.tables)} table files)")
    return 0


EXPORT_EXAMPLES = """examples:
  mnq-search export --storage sqlite:///runs/optuna/study.db --csv trials.csv
  mnq-search export --storage postgresql+psycopg2://me@db:5432/mnq --study qat-6bit --csv trials.csv
  mnq-search export --compare runs --csv strategies.csv
"""


def _cmd_export(args) -> int:
    if args.compare is not None:
        if args.study is not None:
            raise UsageError("--study applies only with --storage")
        from .search._export import export_compare

        n = export_compare(args.compare, args.csv)
        print(f"wrote {args.csv} ({n} runs)")
        return 0
    from .search._export import export_trials
    from .search import storage_url

    name, n = export_trials(storage_url(args.storage), args.study, args.csv)
    print(f"wrote {args.csv} ({n} trials of study {name})")
    return 0


def _cmd_dashboard(args) -> int:
    from .search._dashboard import serve_dashboard
    from .search import storage_url

    serve_dashboard(storage_url(args.storage), args.port)
    return 0


def _cmd_list(args) -> int:
    if args.what == "strategies":
        from strategies import get_strategy, list_strategies

        for name in list_strategies():
            print(f"{name:16s} {get_strategy(name).description}")
    elif args.what == "objectives":
        from objectives import get_objective, list_objectives

        for name in list_objectives():
            cls = get_objective(name)
            print(f"{name:16s} {cls.direction:8s} {cls.description}")
    elif args.what == "methods":
        from .methods import NONLINEAR_METHODS

        for op, methods in NONLINEAR_METHODS.items():
            print(f"{op:10s} {', '.join(methods)}")
    else:
        from .zoo import get_zoo_entry, list_zoo, shipped_record

        for name in list_zoo():
            rec = shipped_record(name)
            weights = ("no weights (mnq-search pretrain)" if rec is None else
                       f"FP top-1 {rec['top1']:.2f} %" if "top1" in rec else "weights shipped")
            print(f"{name:18s} {weights:32s} {get_zoo_entry(name).description}")
        print("any timm model name also works, with --checkpoint PATH")
    return 0


COMMANDS = {"run": _cmd_run, "eval": _cmd_eval, "qat": _cmd_qat, "study": _cmd_study, "pretrain": _cmd_pretrain, "report": _cmd_report,
            "export": _cmd_export, "dashboard": _cmd_dashboard,
            "list": _cmd_list}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        keep_freed_memory()
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"mnq-search: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mnq-search: interrupted", file=sys.stderr)
        return 130
    finally:
        dist = sys.modules.get(f"{__package__}.distributed")  # only if a job started it (torch loaded)
        if dist is not None:
            dist.shutdown()


if __name__ == "__main__":
    sys.exit(main())
