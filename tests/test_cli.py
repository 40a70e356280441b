"""The CLI end to end on CPU, with tiny data: outputs, reproducibility, and bad input (exit 2, one
line, no partial output). The model is the embedded DeiT-Tiny structure with random weights saved
to a file the test makes; Fashion-MNIST comes from the Debian package."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from mnq_search.cli import main
from mnq_search.io import save_weights
from mnq_search.methods import NONLINEAR_METHODS
from strategies import list_strategies
from mnq_search.zoo import create_zoo_model

FAST = ["--calib-size", "16", "--eval-size", "40", "--batch-size", "20", "--quiet"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_weights(create_zoo_model("fmnist-deit-tiny"), path)
    return path


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_run_writes_the_three_files(ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(["run", "--strategy", "sqnr_diff", "--checkpoint", ckpt, "--out", out, *FAST], capsys)
    assert code == 0, err
    assignment = json.loads((out / "assignment.json").read_text())
    result = json.loads((out / "result.json").read_text())
    rows = list(csv.DictReader((out / "sensitivity.csv").open()))
    assert len(assignment["slots"]) == 49 and assignment["strategy"] == "sqnr_diff"
    # one row per slot and method valid for its op: 12*4 softmax + 12*3 gelu + 25*3 layernorm
    assert len(rows) == 12 * len(NONLINEAR_METHODS["softmax"]) + 12 * len(NONLINEAR_METHODS["gelu"]) + 25 * 3
    assert {r["method"] for r in rows if r["op"] == "gelu"} == {"ibert", "ivit", "polyfit"}
    for r in rows:
        assert float(r["sqnr_diff"]) == pytest.approx(float(r["asqnr_out"]) - float(r["asqnr_in"]), abs=2e-4)
    assert sum(result["counts"]["softmax"].values()) == 12
    assert result["slots"] == {"softmax": 12, "gelu": 12, "layernorm": 25}
    assert result["eval_images"] == 40 and 0 <= result["top1_quant"] <= 100
    assert "top-1 FP" in stdout and "fixed seeded subset of 40" in stdout


def test_run_with_allocated_groups_records_them_within_budget(ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(["run", "--strategy", "uniform:ibert", "--bits", "4", "--groups", "alloc:4", "--val-size", "20",
                            "--checkpoint", ckpt, "--out", out, *FAST], capsys)
    assert code == 0, err
    g = json.loads((out / "result.json").read_text())["groups"]
    assert g["setting"] == "alloc:4" and len(g["layers"]) == 12 * 5
    assert g["per_tensor_bops_per_image"] < g["bops_per_image"] <= g["budget_bops"]
    assert set(g["layers"].values()) <= {1, 2, 4, 8, 16}
    assert all(row["1"] == g["sensitivity"]["blocks.0.attn.qkv"]["1"] for row in g["sensitivity"].values())
    out8 = tmp_path / "run8"
    assert run_cli(["run", "--strategy", "uniform:ibert", "--bits", "4", "--groups", "4", "--checkpoint", ckpt,
                    "--out", out8, *FAST], capsys)[0] == 0
    g8 = json.loads((out8 / "result.json").read_text())["groups"]
    assert set(g8["layers"].values()) == {4} and g8["bops_per_image"] == g["budget_bops"]
    # the assignment files keep the groups: eval reproduces both runs
    assert json.loads((out / "assignment.json").read_text())["layer_groups"] == g["layers"]
    for run in (out, out8):
        top1 = json.loads((run / "result.json").read_text())["top1_quant"]
        code, stdout, err = run_cli(["eval", "--assignment", run / "assignment.json", "--checkpoint", ckpt, *FAST], capsys)
        assert code == 0, err
        assert f"top-1 {top1:.2f} %" in stdout
    # and the allocated run warm-starts a joint search: its first trial is that assignment
    joint = tmp_path / "joint"
    code, _, err = run_cli(["run", "--strategy", "optuna", "--bits", "4", "--joint-groups", "--n-trials", "2",
                            "--warm-start", out / "assignment.json", "--val-size", "20", "--checkpoint", ckpt,
                            "--out", joint, *FAST], capsys)
    assert code == 0, err
    trials = json.loads((joint / "search.json").read_text())
    assert str(out / "assignment.json") in json.dumps(trials["warm_starts"])


def test_mixqvit_with_separate_input_bits_and_eval(ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(["run", "--strategy", "mixqvit", "--budget", "w6a6", "--search-bits", "w4a8,w8a4",
                            "--val-size", "20", "--checkpoint", ckpt, "--out", out, *FAST], capsys)
    assert code == 0, err
    result = json.loads((out / "result.json").read_text())
    layers = {n: tuple(v) for n, v in result["search"]["bits"]["layers"].items()}
    assert set(layers.values()) <= {(4, 8), (8, 4), (8, 8)} and {(4, 8), (8, 4)} & set(layers.values())
    assert result["search"]["bits"]["bops_per_image"] <= result["search"]["budget_bops"]
    saved = json.loads((out / "assignment.json").read_text())["layer_bits"]
    assert saved == {n: w if w == a else f"w{w}a{a}" for n, (w, a) in layers.items()}
    code, stdout, err = run_cli(["eval", "--assignment", out / "assignment.json", "--checkpoint", ckpt, *FAST], capsys)
    assert code == 0, err
    assert f"top-1 {result['top1_quant']:.2f} %" in stdout  # eval applied both bit-widths of every layer


def test_qat_records_every_layers_bits_and_the_report_reads_its_width(ckpt, tmp_path, capsys):
    """QAT of an assignment that puts every weight layer at 6 bits under the model-wide 8 records all
    layers' bits in result.json, and the report files the run under 6 bits."""
    from mnq_search.convert import convert_model
    from mnq_search.mixprec._search import layer_bits
    from mnq_search.report._inputs import Folder

    out = tmp_path / "run"
    assert run_cli(["run", "--strategy", "uniform:ibert", "--checkpoint", ckpt, "--out", out, *FAST], capsys)[0] == 0
    assignment = json.loads((out / "assignment.json").read_text())
    names = list(layer_bits(convert_model(create_zoo_model("fmnist-deit-tiny"), 8)))
    assert len(names) == 50 and "layer_bits" not in assignment
    assignment["layer_bits"] = dict.fromkeys(names, 6)
    (tmp_path / "a6.json").write_text(json.dumps(assignment))
    q = tmp_path / "qat"
    code, _, err = run_cli(["qat", "--assignment", tmp_path / "a6.json", "--steps", "1", "--qat-batch-size", "8",
                            "--checkpoint", ckpt, "--out", q, *FAST], capsys)
    assert code == 0, err
    result = json.loads((q / "result.json").read_text())
    assert result["bits"] == 8 and result["layer_bits"]["layers"] == {n: [6, 6] for n in names}
    assert result["layer_bits"]["bops_per_image"] > 0
    assert Folder(q, "qat", result=result).bits == 6


def test_mixqvit_bit_sensitivity_cache_is_shared_and_checked(ckpt, tmp_path, capsys):
    cache = tmp_path / "bits.json"
    common = ["run", "--strategy", "mixqvit", "--search-bits", "4,8", "--val-size", "20", "--checkpoint", ckpt,
              "--bit-sensitivity-cache", cache, *FAST]
    assert run_cli([*common, "--budget", "w6a6", "--out", tmp_path / "a"], capsys)[0] == 0
    measured = json.loads(cache.read_text())
    assert measured["key"]["search_bits"] == ["w4a4", "w8a8"] and len(measured["sensitivity"]) == 12 * 4 + 2
    cache.write_text(json.dumps({**measured, "kl0": 123.0}))  # a marker: the next run reads, not measures
    assert run_cli([*common, "--budget", "w5a5", "--importance", "lrp", "--out", tmp_path / "b"], capsys)[0] == 0
    s = json.loads((tmp_path / "b" / "result.json").read_text())["search"]
    assert s["kl_baseline_bits"] == 123.0 and s["sensitivity"] == measured["sensitivity"]
    code, _, err = run_cli(["run", "--strategy", "mixqvit", "--search-bits", "4,6", "--val-size", "20", "--checkpoint",
                            ckpt, "--bit-sensitivity-cache", cache, *FAST, "--budget", "w6a6", "--out", tmp_path / "c"],
                           capsys)
    assert code == 2 and "measured for other settings" in err


@pytest.mark.parametrize("importance", ["none", "hessian"])
def test_mixqvit_allocates_bits_within_the_budget(ckpt, tmp_path, capsys, importance):
    out = tmp_path / "run"
    code, _, err = run_cli(["run", "--strategy", "mixqvit", "--budget", "w6a6", "--search-bits", "4,8", "--val-size", "20",
                            "--importance", importance, "--checkpoint", ckpt, "--out", out, *FAST], capsys)
    assert code == 0, err
    s = json.loads((out / "result.json").read_text())["search"]
    layers = s["bits"]["layers"]
    assert len(layers) == 12 * 4 + 2 and {tuple(v) for v in layers.values()} <= {(4, 4), (8, 8)}
    assert {tuple(v) for v in layers.values()} == {(4, 4), (8, 8)}  # w6a6 lies between: both are used
    assert s["bits"]["bops_per_image"] <= s["budget_bops"]
    assert all(row["w8a8"] == 0.0 for row in s["sensitivity"].values())
    assert s["methods"]["strategy"].startswith("uniform:")
    saved = json.loads((out / "assignment.json").read_text())["layer_bits"]  # the allocation, for eval
    assert saved == {n: v[0] for n, v in layers.items()}
    weights = s["layer_importance"]
    if importance == "none":
        assert weights is None
        code, stdout, err = run_cli(["eval", "--assignment", out / "assignment.json", "--checkpoint", ckpt, *FAST], capsys)
        assert code == 0, err
        top1 = json.loads((out / "result.json").read_text())["top1_quant"]
        assert f"top-1 {top1:.2f} %" in stdout  # eval applied the allocated bits
    else:  # Hutchinson traces per weight, one per weight layer, clipped at 0 and not all 0
        assert set(weights) == set(layers) and min(weights.values()) >= 0 and max(weights.values()) > 0


def test_joint_bits_and_methods_front_and_budget(ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(["run", "--strategy", "optuna", "--objective", "proxy,bops", "--sampler", "nsga2", "--joint-bits",
                            "--search-bits", "4,6", "--budget", "w6a6", "--n-trials", "8", "--warm-start", "uniform:ibert",
                            "--val-size", "20", "--checkpoint", ckpt, "--out", out, *FAST], capsys)
    assert code == 0, err
    result = json.loads((out / "result.json").read_text())
    front = json.loads((out / "pareto.json").read_text())["front"]
    gbops = [p["values"]["gbops"] for p in front]
    kls = [p["values"]["kl"] for p in front]
    assert kls == sorted(kls) and gbops == sorted(gbops, reverse=True)  # a front: cheaper means worse
    assert result["layer_bits"]["bops_per_image"] / 1e9 <= result["search"]["budget_gbops"]
    saved = json.loads((out / "assignment.json").read_text())["layer_bits"]
    assert len(saved) == 12 * 4 + 2 and set(saved.values()) <= {4, 6, 8}
    # pareto.csv: the front as a table, with each point's weight storage at its bits
    import csv

    rows = list(csv.DictReader((out / "pareto.csv").open()))
    assert [int(r["trial"]) for r in rows] == [p["number"] for p in front]
    assert [float(r["gbops"]) for r in rows] == pytest.approx(gbops)
    from mnq_search.mixprec import layer_params, weight_bytes

    params = layer_params(create_zoo_model("fmnist-deit-tiny"))
    for r, p in zip(rows, front):
        bits = {k[: -len("@bits")]: (v, v) for k, v in p["slots"].items() if k.endswith("@bits")}
        assert float(r["weight_bytes"]) == pytest.approx(weight_bytes(params, bits))
        assert sum(int(v) for k, v in r.items() if k.startswith("softmax.")) == 12  # methods per op: 12 softmax slots


def test_one_objective_under_a_budget_is_a_constraint(ckpt, tmp_path, capsys):
    import optuna

    out = tmp_path / "run"
    code, _, err = run_cli(["run", "--strategy", "optuna", "--objective", "proxy", "--bits", "6", "--joint-bits",
                            "--search-bits", "4,6", "--budget", "w5a5", "--n-trials", "6", "--warm-start", "uniform:ibert,uniform:ivit",
                            "--val-size", "20", "--checkpoint", ckpt, "--out", out, *FAST], capsys)
    assert code == 0, err
    result = json.loads((out / "result.json").read_text())
    budget = result["search"]["budget_gbops"]
    assert result["layer_bits"]["bops_per_image"] / 1e9 <= budget
    study = optuna.load_study(study_name=result["search"]["study"], storage=f"sqlite:///{out / 'study.db'}")
    trials = study.get_trials()
    assert len(trials) == 6
    for t in trials:  # every trial carries its cost and the constraint the samplers see
        assert t.constraints["gbops"] == pytest.approx(t.user_attrs["gbops"] - budget)
    assert [t.constraints["gbops"] > 0 for t in trials[:2]] == [True, True]  # the all-6-bit warm starts break it
    feasible = [t for t in trials if t.constraints["gbops"] <= 0]
    assert result["search"]["best"]["number"] == min(feasible, key=lambda t: (t.value, t.number)).number


def test_joint_slot_bits_search_budget_and_eval(ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(["run", "--strategy", "optuna", "--objective", "proxy", "--joint-nl-bits",
                            "--search-nl-bits", "4,8", "--budget", "w8a8", "--n-trials", "4", "--warm-start",
                            "uniform:ibert", "--val-size", "20", "--checkpoint", ckpt, "--out", out, *FAST], capsys)
    assert code == 0, err
    result = json.loads((out / "result.json").read_text())
    saved = json.loads((out / "assignment.json").read_text())["layer_bits"]
    softmax_gelu = {s for s in saved if s.endswith((".attn.softmax", ".mlp.act"))}
    assert softmax_gelu == set(saved) and len(saved) == 2 * 12 and set(saved.values()) <= {4, 8}
    assert result["slot_bits"]["slots"] == saved and "layer_bits" not in result  # no weight layer's bits searched
    assert result["slot_bits"]["attention_bops_per_image"] > 0
    # the budget of uniform w8a8 counts the probabilities at 8 bits: every slot at 8 is feasible, at 4 cheaper
    assert result["search"]["budget_gbops"] > 0
    code, stdout, err = run_cli(["eval", "--assignment", out / "assignment.json", "--checkpoint", ckpt, *FAST], capsys)
    assert code == 0, err
    assert f"top-1 {result['top1_quant']:.2f} %" in stdout  # eval applied the searched slot bits


def test_joint_groups_and_methods_front_budget_and_eval(ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(["run", "--strategy", "optuna", "--objective", "proxy,bops", "--sampler", "nsga2",
                            "--joint-groups", "--search-groups", "1,4", "--budget", "w8a8g2", "--n-trials", "8",
                            "--warm-start", "uniform:ibert", "--val-size", "20", "--checkpoint", ckpt, "--out", out,
                            *FAST], capsys)
    assert code == 0, err
    result = json.loads((out / "result.json").read_text())
    front = json.loads((out / "pareto.json").read_text())["front"]
    gbops = [p["values"]["gbops"] for p in front]
    assert gbops == sorted(gbops, reverse=True)
    saved = json.loads((out / "assignment.json").read_text())["layer_groups"]
    assert len(saved) == 12 * 5 and set(saved.values()) <= {1, 4}  # 4 linears + probabilities per block
    assert result["groups"]["setting"] == "searched" and result["groups"]["layers"] == saved
    chosen = [p for p in front if {k[: -len("@groups")]: v for k, v in p["slots"].items() if k.endswith("@groups")} == saved]
    assert chosen and chosen[0]["values"]["gbops"] <= result["search"]["budget_gbops"]
    # the cheapest front point is per tensor everywhere (w8a8, no overhead); the budget adds 2 groups' overhead
    cheapest = front[-1]
    assert {v for k, v in cheapest["slots"].items() if k.endswith("@groups")} == {1}
    assert result["search"]["budget_gbops"] > cheapest["values"]["gbops"]
    code, stdout, err = run_cli(["eval", "--assignment", out / "assignment.json", "--checkpoint", ckpt, *FAST], capsys)
    assert code == 0, err
    assert f"top-1 {result['top1_quant']:.2f} %" in stdout  # eval applied the searched groups


def test_the_greedy_rule_picks_the_lowest_diff(ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(["run", "--strategy", "sqnr_diff", "--checkpoint", ckpt, "--out", out, *FAST], capsys)[0] == 0
    rows = list(csv.DictReader((out / "sensitivity.csv").open()))
    chosen = json.loads((out / "assignment.json").read_text())["slots"]
    for slot, method in chosen.items():
        diffs = {r["method"]: float(r["sqnr_diff"]) for r in rows if r["slot"] == slot}
        assert diffs[method] == min(diffs.values())


@pytest.mark.parametrize("strategy", ["sqnr_gain", "random"])
def test_same_seed_same_assignment(ckpt, tmp_path, capsys, strategy):
    got = []
    for i in range(2):
        out = tmp_path / f"r{i}"
        code, _, err = run_cli(["run", "--strategy", strategy, "--checkpoint", ckpt, "--out", out, "--seed", "3",
                                *FAST], capsys)
        assert code == 0, err
        got.append(json.loads((out / "assignment.json").read_text())["slots"])
    assert got[0] == got[1]


def test_eval_reproduces_the_run(ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(["run", "--strategy", "uniform:ivit", "--checkpoint", ckpt, "--out", out, *FAST], capsys)[0] == 0
    result = json.loads((out / "result.json").read_text())
    results_file = tmp_path / "results.csv"
    code, stdout, err = run_cli(["eval", "--assignment", out / "assignment.json", "--checkpoint", ckpt,
                                 "--results-file", results_file, *FAST], capsys)
    assert code == 0, err
    assert f"top-1 {result['top1_quant']:.2f} %" in stdout
    rows = list(csv.DictReader(results_file.open()))
    assert len(rows) == 1 and float(rows[0]["top1"]) == pytest.approx(result["top1_quant"])


def test_fine_grid_flag_is_recorded_and_reused(ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(["run", "--strategy", "uniform:ibert", "--bits", "6", "--fine-grid", "--checkpoint", ckpt,
                            "--out", out, *FAST], capsys)
    assert code == 0, err
    result = json.loads((out / "result.json").read_text())
    assert result["fine_grid"] is True and json.loads((out / "assignment.json").read_text())["fine_grid"] is True
    code, stdout, err = run_cli(["eval", "--assignment", out / "assignment.json", "--checkpoint", ckpt, *FAST], capsys)
    assert code == 0, err
    assert f"top-1 {result['top1_quant']:.2f} %" in stdout  # eval took fine_grid from the file


def test_post_ln_channel_is_recorded_and_reused(ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(["run", "--strategy", "uniform:ibert", "--bits", "4", "--post-ln", "channel", "--checkpoint",
                            ckpt, "--out", out, *FAST], capsys)
    assert code == 0, err
    result = json.loads((out / "result.json").read_text())
    assert result["post_ln"] == "channel" and json.loads((out / "assignment.json").read_text())["post_ln"] == "channel"
    code, stdout, err = run_cli(["eval", "--assignment", out / "assignment.json", "--checkpoint", ckpt, *FAST], capsys)
    assert code == 0, err
    assert f"top-1 {result['top1_quant']:.2f} %" in stdout  # eval folded the model as the file says


def test_imagefolder_and_timm_checkpoint(tmp_path, capsys):
    """--model <timm name> --checkpoint FILE --data imagefolder:PATH (tiny generated images)."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=3)
    ckpt = tmp_path / "deit.pth"
    torch.save({"model": model.state_dict()}, ckpt)  # the layout of the official DeiT checkpoints
    for split in ("train", "val"):
        for c in range(3):
            d = tmp_path / "imgs" / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(2):
                Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()).save(d / f"{i}.png")
    # a fine-tuned checkpoint keeps its own head (3 classes here; timm's default is 1000) ...
    code, _, err = run_cli(["run", "--strategy", "uniform:ibert", "--model", "deit_tiny_patch16_224", "--checkpoint",
                            ckpt, "--data", f"imagefolder:{tmp_path / 'imgs'}", "--out", tmp_path / "o3", *FAST], capsys)
    assert code == 0, err
    # ... but a tensor other than the head that does not fit is a one-line error naming it
    wrong = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=3, mlp_ratio=2)
    torch.save(wrong.state_dict(), tmp_path / "wrong.pth")
    code, _, err = run_cli(["run", "--model", "deit_tiny_patch16_224", "--checkpoint", tmp_path / "wrong.pth", "--data",
                            f"imagefolder:{tmp_path / 'imgs'}", "--out", tmp_path / "o", *FAST], capsys)
    assert code == 2 and "shape of blocks.0.mlp.fc1.weight" in err and err.count("\n") == 1
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    torch.save(model.state_dict(), ckpt)
    code, stdout, err = run_cli(["run", "--strategy", "uniform:ibert", "--model", "deit_tiny_patch16_224",
                                 "--checkpoint", ckpt, "--data", f"imagefolder:{tmp_path / 'imgs'}",
                                 "--out", tmp_path / "o", "--calib-size", "4", "--eval-size", "6",
                                 "--batch-size", "3", "--quiet"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "result.json").read_text())["eval_images"] == 6


def _bad_cases(tmp_path, ckpt):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01 not a checkpoint at all")
    corrupt_pt = tmp_path / "corrupt.pth"
    corrupt_pt.write_bytes(b"PK\x03\x04 truncated zip")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(Path(ckpt).read_bytes()[:-100])
    empty = tmp_path / "empty"
    (empty / "val" / "c0").mkdir(parents=True)
    bad_assign = tmp_path / "bad.json"
    bad_assign.write_text(json.dumps({"slots": {"blocks.0.nrm1": "ivit"}}))
    bad_method = tmp_path / "badm.json"
    bad_method.write_text(json.dumps({"default": {"softmax": "ivit", "gelu": "fqvit", "layernorm": "ivit"}}))
    not_json = tmp_path / "nj.json"
    not_json.write_text("{oops")
    c = ["--checkpoint", str(ckpt)]
    return {
        "unknown strategy": (["run", "--strategy", "sqnr_dif", *c], "unknown strategy 'sqnr_dif' (did you mean 'sqnr_diff'?)"),
        "unknown uniform arg": (["run", "--strategy", "uniform:foo", *c], "uniform:ibert"),
        "unknown model": (["run", "--model", "deit_tinny_patch16_224"], "unknown model"),
        "bits too high": (["run", "--bits", "9", *c], "4..8"),
        "bits too low": (["run", "--bits", "3", *c], "4..8"),
        "bits not a number": (["run", "--bits", "eight", *c], "invalid int value"),
        "missing checkpoint": (["run", "--checkpoint", str(tmp_path / "nope.safetensors")], "nope.safetensors not found"),
        "corrupt checkpoint": (["run", "--checkpoint", str(corrupt)], "corrupt"),
        "corrupt torch checkpoint": (["run", "--checkpoint", str(corrupt_pt)], "corrupt"),
        "truncated safetensors": (["run", "--checkpoint", str(truncated)], "data extends past the end"),
        "timm name without weights": (["run", "--model", "deit_tiny_patch16_224"], "needs local weights"),
        "missing data": (["run", "--data", "fmnist:/nonexistent", *c], "Fashion-MNIST not found"),
        "missing image folder": (["run", "--data", f"imagefolder:{tmp_path / 'nope'}", *c], "not found"),
        "empty image folder": (["run", "--model", "deit_tiny_patch16_224", *c[:0], "--checkpoint", str(ckpt),
                                "--data", f"imagefolder:{empty}"], None),
        "bad data spec": (["run", "--data", "mnist", *c], "unknown data spec"),
        "bad eval size": (["run", "--eval-size", "-3", *c], "--eval-size"),
        "bad groups": (["run", "--groups", "alloc:1", *c], "--groups"),
        "budget without mixqvit": (["run", "--budget", "w6a6", *c], "--budget applies only to --strategy mixqvit"),
        "mixqvit without budget": (["run", "--strategy", "mixqvit", *c], "needs --budget"),
        "bad budget": (["run", "--strategy", "mixqvit", "--budget", "six bits", *c], "--budget"),
        "bad search bits": (["run", "--strategy", "mixqvit", "--budget", "w6a6", "--search-bits", "1,8", *c],
                            "--search-bits"),
        "joint bits with sequential": (["run", "--strategy", "sequential", "--joint-bits", *c], "--joint-bits"),
        "budget with optuna, no joint bits": (["run", "--strategy", "optuna", "--budget", "w6a6", *c],
                                              "--budget applies only"),
        "joint groups with fixed groups": (["run", "--strategy", "random", "--joint-groups", "--groups", "8", *c],
                                           "leave --groups at 1"),
        "group budget without joint groups": (["run", "--strategy", "optuna", "--objective", "proxy,bops", "--joint-bits",
                                               "--budget", "w6a6g8", *c], "needs --joint-groups"),
        "bit sensitivity cache without mixqvit": (["run", "--bit-sensitivity-cache", str(tmp_path / "b.json"), *c],
                                                  "--bit-sensitivity-cache applies only"),
        "missing warm start file": (["run", "--strategy", "optuna", "--warm-start", str(tmp_path / "none.json"), *c],
                                    "--warm-start"),
        "bad search groups": (["run", "--strategy", "random", "--joint-groups", "--search-groups", "1,x", *c],
                              "--search-groups"),
        "zero search groups": (["run", "--strategy", "random", "--joint-groups", "--search-groups", "0,2", *c],
                               "--search-groups"),
        "joint slot bits with a greedy rule": (["run", "--strategy", "sqnr_diff", "--joint-nl-bits", *c],
                                               "--joint-nl-bits"),
        "slot bits out of range": (["run", "--strategy", "random", "--joint-nl-bits", "--search-nl-bits", "3,8", *c],
                                   "--search-nl-bits"),
        "bad mixqvit argument": (["run", "--strategy", "mixqvit:random", "--budget", "w6a6", *c], "mixqvit:sequential"),
        "negative multicrop": (["run", "--strategy", "uniform:ibert", "--qat-epochs", "1", "--multicrop", "-1", *c],
                               "--multicrop"),
        "multicrop with distill": (["qat", "--assignment", str(bad_assign), "--multicrop", "2", "--distill", *c],
                                   "drop --distill"),
        "bad post-ln": (["run", "--post-ln", "row", *c], "--post-ln"),
        "unknown slot": (["eval", "--assignment", str(bad_assign), *c], "unknown slot 'blocks.0.nrm1' (did you mean 'blocks.0.norm1'?)"),
        "method invalid for op": (["eval", "--assignment", str(bad_method), *c], "not valid for gelu"),
        "assignment not json": (["eval", "--assignment", str(not_json), *c], "not valid JSON"),
        "missing assignment": (["eval", "--assignment", str(tmp_path / "none.json"), *c], "not found"),
        "unknown list": (["list", "everything"], "invalid choice"),
        "qat without assignment file": (["qat", "--assignment", str(tmp_path / "none.json"), *c], "not found"),
        "qat nothing to resume": (["qat", "--assignment", str(bad_assign), "--resume", str(tmp_path / "no-run"), *c],
                                  "nothing to resume"),
        "qat zero steps": (["qat", "--assignment", str(bad_method), "--steps", "0", *c], "--steps must be positive"),
        "study spec missing": (["study", "run", str(tmp_path / "none.toml")], "study spec not found"),
        "pretrain zero epochs": (["pretrain", "fmnist-deit-tiny", "--epochs", "0"], "--epochs must be positive"),
        "unknown zoo model": (["pretrain", "fmnist-deit-tiny2"], "unknown zoo model"),
    }


def test_every_bad_input_exits_2_with_one_line_and_no_output(ckpt, tmp_path, capsys):
    for name, (args, needle) in _bad_cases(tmp_path, ckpt).items():
        out = tmp_path / f"out-{name.replace(' ', '_')}"
        full = args + (["--out", str(out)] if args[0] == "run" else []) + (["--quiet"] if args[0] in ("run", "eval") else [])
        code, stdout, err = run_cli(full, capsys)
        assert code == 2, (name, err)
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("mnq-search: error: "), (name, err)
        if needle:
            assert needle in lines[0], (name, lines[0])
        assert not out.exists(), name  # nothing written


def test_list_commands(capsys):
    assert run_cli(["list", "strategies"], capsys)[1].count("\n") == len(list_strategies())
    out = run_cli(["list", "methods"], capsys)[1]
    assert "gelu       ibert, ivit, polyfit" in out
    models = {line.split()[0]: line for line in run_cli(["list", "models"], capsys)[1].splitlines()}
    assert "FP top-1 87.64 %" in models["fmnist-deit-tiny"]  # the shipped record's test top-1
    assert "no weights (mnq-search pretrain)" in models["fmnist-vit-small"]


def _image_folder(root, classes: int, size: int = 40, per_class: int = 1):
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray((torch.rand(size, size, 3) * 255).byte().numpy()).save(d / f"{i}.png")
    return root


@pytest.mark.parametrize("name, classes, head", [("swin_tiny_patch4_window7_224", 10, "head.fc.weight"),
                                                  ("vit_tiny_patch16_224", 7, "head.weight")])
def test_a_fine_tuned_checkpoint_brings_its_own_head(tmp_path, capsys, name, classes, head):
    """A user's fine-tuned timm checkpoint loads with its number of classes (from its classifier,
    ViT/DeiT ``head`` or Swin ``head.fc``) and evaluates on an ImageFolder with those classes."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=classes)
    assert model.state_dict()[head].shape[0] == classes
    ckpt = tmp_path / "finetuned.safetensors"
    save_weights(model, ckpt)
    folder = _image_folder(tmp_path / "imgs", classes)
    code, _, err = run_cli(["run", "--strategy", "uniform:ivit", "--model", name, "--checkpoint", ckpt,
                            "--data", f"imagefolder:{folder}", "--out", tmp_path / "o", "--calib-size", "2",
                            "--eval-size", str(classes), "--batch-size", "2", "--quiet"], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "o" / "result.json").read_text())
    assert result["eval_images"] == classes and 0 <= result["top1_quant"] <= 100
    # --num-classes names it explicitly; a number that does not match the file is an error
    code, _, err = run_cli(["run", "--model", name, "--checkpoint", ckpt, "--num-classes", str(classes + 1),
                            "--data", f"imagefolder:{folder}", "--out", tmp_path / "o2", *FAST], capsys)
    assert code == 2 and f"shape of {head}" in err


def _preflight_cases(tmp_path, ckpt):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01 not a checkpoint")
    bad_assign = tmp_path / "bad.json"
    bad_assign.write_text(json.dumps({"slots": {"blocks.0.nrm1": "ivit"}}))
    c = ["--checkpoint", str(ckpt)]
    return {
        "out under a file": (["run", *c, "--out", str(a_file / "sub")], "is a file, so the folder cannot be created"),
        "out is a file": (["run", *c, "--out", str(a_file)], "exists and is not a folder"),
        "storage URL does not parse": (["run", "--strategy", "optuna", *c, "--storage", "postgres:/nope"], "storage URL"),
        "storage driver missing": (["run", "--strategy", "optuna", *c, "--storage", "postgresql+pg8000://u@127.0.0.1:1/db"],
                                   "cannot use storage"),
        "storage does not connect": (["run", "--strategy", "optuna", *c,
                                      "--storage", "postgresql+psycopg2://u@127.0.0.1:1/db"], "cannot connect to storage"),
        "storage option without optuna": (["run", *c, "--n-trials", "3"], "applies only to --strategy optuna"),
        "checkpoint does not open": (["run", "--checkpoint", str(corrupt)], "corrupt"),
        "data spec does not resolve": (["run", *c, "--data", f"imagefolder:{tmp_path / 'nowhere'}"], "not found"),
        "assignment names an unknown slot": (["eval", "--assignment", str(bad_assign), *c], "unknown slot"),
        "results file under a file": (["eval", "--assignment", str(bad_assign), *c, "--results-file", str(a_file / "r.csv")],
                                       "is not a folder"),
    }


def test_bad_inputs_fail_in_seconds_before_any_work(ckpt, tmp_path):
    """Issue 10: output folders, storages, checkpoints, data and assignment files are checked before
    any model work: exit 2, one line on stderr, nothing written, within seconds of the start (the
    goal is 2 s; the bound here is 5 s, in a fresh interpreter, so the test is not flaky)."""
    import subprocess
    import sys
    import time

    pytest.importorskip("psycopg2")
    for name, (args, needle) in _preflight_cases(tmp_path, ckpt).items():
        before = sorted(p.name for p in tmp_path.iterdir())
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "mnq_search.cli", *args, "--quiet"], capture_output=True, text=True,
                              timeout=60)
        seconds = time.perf_counter() - t
        assert proc.returncode == 2, (name, proc.stderr)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and needle in lines[0], (name, proc.stderr)
        assert seconds < 5.0, (name, seconds)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, name  # nothing written
