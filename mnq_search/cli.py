"""``mnq-search``: quantize a ViT to integers and choose a non-linear method per layer.

Every known error prints one line (``mnq-search: error: ...``) and exits with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from .errors import UsageError

EXAMPLES = """examples:
  mnq-search run --strategy sqnr_diff                  # embedded Fashion-MNIST DeiT-Tiny, 8 bits
  mnq-search run --strategy uniform:ivit --bits 6 --out runs/ivit6
  mnq-search run --model deit_tiny_patch16_224 --checkpoint deit_tiny.pth --data imagefolder:/data/imagenet
  mnq-search eval --assignment runs/default/assignment.json
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


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None,
                   help="zoo name (mnq-search list models) or timm name (default: fmnist-deit-tiny)")
    g.add_argument("--checkpoint", default=None, help="local weights: safetensors or torch state dict (default: the zoo's)")
    g.add_argument("--data", default=None,
                   help="fmnist, fmnist:PATH or imagefolder:PATH (default: the model's own data set)")
    g.add_argument("--download", action="store_true", help="let torchvision download Fashion-MNIST if missing")


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantization and evaluation")
    g.add_argument("--bits", type=int, default=8, help="weight/activation bit-width, 4..8 (default: 8)")
    g.add_argument("--calib-size", type=int, default=128, help="calibration images from the train split (default: 128)")
    g.add_argument("--eval-size", type=_eval_size, default=2000,
                   help="evaluation images: a fixed seeded subset of the test split, or 'all' (default: 2000)")
    g.add_argument("--batch-size", type=int, default=250, help="evaluation batch size (default: 250)")
    g.add_argument("--seed", type=int, default=0, help="seed of calibration subset and strategies (default: 0)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from .pipeline import RunConfig

    parser = _Parser(prog="mnq-search", description=__doc__.splitlines()[0], epilog=EXAMPLES,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("run", help="choose a method per slot with a strategy and evaluate it",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategy", default=RunConfig.strategy,
                   help="strategy name (mnq-search list strategies) (default: sqnr_diff)")
    p.add_argument("--out", default=RunConfig.out, help="output folder (default: runs/default)")
    p.add_argument("--asqnr-form", default="amplitude", choices=("amplitude", "eq10"),
                   help="ASQNR form: per-sample amplitude ratio, or the paper's Eq. 10 as printed (default: amplitude)")
    p.add_argument("--sensitivity", action="store_true",
                   help="measure the sensitivity table even when the strategy does not need it")
    p.add_argument("--qat-epochs", type=int, default=0, help="QAT epochs after the assignment (default: 0, PTQ only)")
    _add_model_args(p)
    _add_quant_args(p)

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
    g.add_argument("--resume", default=None, help="continue the run in this folder from its last checkpoint")
    g.add_argument("--out", default=None, help="output folder (default: the --resume folder, else runs/qat)")
    _add_model_args(p)
    _add_quant_args(p)
    p.set_defaults(bits=None)

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

    p = sub.add_parser("list", help="list strategies, objectives, methods or models")
    p.add_argument("what", choices=("strategies", "objectives", "methods", "models"))
    return parser


def _print_run_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"{result['model']} · {result['bits']}-bit · strategy {result['strategy']}")
    table.add_column("op")
    methods = ["ibert", "fqvit", "ivit"]
    for m in methods:
        table.add_column(m, justify="right")
    for op, row in result["counts"].items():
        table.add_row(op, *[str(row.get(m, "-")) if m in row else "-" for m in methods])
    console.print(table)
    n = result["eval_images"]
    subset = "all test images" if result["eval_size"] == "all" else f"a fixed seeded subset of {n} test images"
    console.print(f"top-1 FP {result['top1_fp']:.2f} %   quantized {result['top1_quant']:.2f} %   "
                  f"({subset}; {result['calib_images']} calibration images; {result['wall_time_s']:.1f} s)")


def _cmd_run(args) -> int:
    from .pipeline import RunConfig, run

    cfg = RunConfig(strategy=args.strategy, model=args.model, checkpoint=args.checkpoint, data=args.data,
                    bits=args.bits, calib_size=args.calib_size, eval_size=args.eval_size,
                    batch_size=args.batch_size, out=args.out, seed=args.seed, device=args.device,
                    asqnr_form=args.asqnr_form, sensitivity=args.sensitivity, download=args.download,
                    progress=not args.quiet, qat_epochs=args.qat_epochs)
    if args.qat_epochs < 0:
        raise UsageError(f"--qat-epochs must be 0 or more, got {args.qat_epochs}")
    result = run(cfg)
    _print_run_table(result)
    files = ["assignment.json"] + (["sensitivity.csv"] if result["sensitivity_measured"] else []) + ["result.json"]
    print("wrote " + ", ".join(os.path.join(args.out, f) for f in files))
    return 0


def _cmd_eval(args) -> int:
    from .pipeline import evaluate_assignment

    res = evaluate_assignment(args.assignment, args.model, args.checkpoint, args.data, args.bits, args.calib_size,
                              args.eval_size, args.batch_size, args.seed, args.device, args.results_file,
                              progress=not args.quiet)
    print(f"{res['model']} {res['bits']}-bit {res['assignment']}: top-1 {res['top1']:.2f} %  "
          f"top-5 {res['top5']:.2f} %  ({res['images']} images, {res['seconds']:.1f} s)")
    return 0


def _cmd_qat(args) -> int:
    from .pipeline import QATJob, qat_job
    from .qat import QATConfig

    qcfg = QATConfig(epochs=args.epochs or 1, steps=args.steps, lr=args.lr, batch_size=args.qat_batch_size,
                     weight_decay=args.weight_decay, distill=args.distill, seed=args.seed)
    job = QATJob(args.assignment, args.out, args.resume, args.model, args.checkpoint, args.data, args.bits,
                 args.calib_size, args.eval_size, args.batch_size, args.device, progress=not args.quiet)
    res = qat_job(job, qcfg)
    if res:
        print(f"{res['model']} {res['bits']}-bit: top-1 PTQ {res['top1_ptq']:.2f} % -> QAT {res['top1_qat']:.2f} % "
              f"({len(res['history'])} evaluations, {res['qat_seconds']:.0f} s); wrote {job.out or job.resume or 'runs/qat'}")
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
        from .zoo import get_zoo_entry, list_zoo

        for name in list_zoo():
            print(f"{name:18s} {get_zoo_entry(name).description}")
        print("any timm model name also works, with --checkpoint PATH")
    return 0


COMMANDS = {"run": _cmd_run, "eval": _cmd_eval, "qat": _cmd_qat, "pretrain": _cmd_pretrain, "report": _cmd_report,
            "list": _cmd_list}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"mnq-search: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mnq-search: interrupted", file=sys.stderr)
        return 130
    finally:
        from . import distributed

        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
