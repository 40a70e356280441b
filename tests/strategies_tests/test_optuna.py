"""The optuna strategy and the whole-assignment objectives: warm starts first, reproducible with a
seed, a non-dominated Pareto front, the cost table and its overrides, the short-QAT objective on
held-out training images, samplers, and option errors (one line, exit 2, before any model loads).

The strategy runs on a RunContext built once (the embedded model's structure, random weights,
two calibration images, a synthetic sensitivity table), as the pipeline builds it.
"""

from __future__ import annotations

import json
import math

import optuna
import pytest

from mnq_search.cli import main
from mnq_search.convert import convert_model
from mnq_search.errors import UsageError
from mnq_search.context import RunContext, RunSettings
from mnq_search.pipeline import prepare, read_sensitivity_csv
from mnq_search.qat import QATConfig
from mnq_search.search import SearchOptions, list_samplers, make_sampler
from mnq_search.search import open_storage
from mnq_search.methods import uniform_assignment
from mnq_search.slot import methods_for
from objectives import Objective, get_objective, list_objectives
from objectives.cost import CostObjective, load_cost_table, method_cost
from objectives.qat import QATObjective
from strategies import get_strategy, list_strategies
from strategies.optuna_joint import default_warm_starts
from tests.search_fixtures import make_checkpoint, make_sensitivity, one_torch_thread  # noqa: F401 (autouse)
from tests.conftest import needs_full_fmnist

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("optuna")
    ckpt = make_checkpoint(d / "tiny.safetensors")
    model, _, data = prepare(None, str(ckpt), None)
    qmodel = convert_model(model, 8)
    return model, qmodel, data, read_sensitivity_csv(make_sensitivity(d / "sensitivity.csv")), ckpt


def make_ctx(base, out, qat=None, **options) -> RunContext:
    model, qmodel, data, rows, _ = base
    settings = RunSettings(strategy="optuna", calib_size=2, eval_size=2, batch_size=2, out=str(out), progress=False,
                           search=SearchOptions.from_dict(options), qat=qat)
    return RunContext(settings=settings, slot_ops=qmodel.slot_ops(), model=model, qmodel=qmodel, data=data,
                      device="cpu", sensitivity=rows)


def search(base, out, **options):
    """The strategy as the pipeline runs it; returns (assignment, study, search summary)."""
    strategy = get_strategy("optuna")
    ctx = make_ctx(base, out, **options)
    outcome = strategy.run(ctx)
    assignment, info = outcome.assignment, json.loads(json.dumps(outcome.search))  # as search.json holds it
    if outcome.pareto is not None:  # and to pareto.json
        (out / "pareto.json").write_text(json.dumps(outcome.pareto))
    url = options.get("storage") or f"sqlite:///{(out / 'study.db').resolve()}"
    return assignment, optuna.load_study(study_name=info["study"], storage=open_storage(url)), info


def test_registered():
    assert "optuna" in list_strategies()
    assert {"proxy", "proxy_sqnr", "qat", "cost"} <= set(list_objectives(Objective))
    for name in list_objectives(Objective):
        cls = get_objective(name, Objective)
        assert cls.direction in ("minimize", "maximize") and cls.metric and cls.description


def test_warm_starts_are_the_first_trials(base, tmp_path):
    ctx = make_ctx(base, tmp_path)
    expected = {}
    for name in default_warm_starts():
        a = ctx.search_space.complete(get_strategy(name).select(ctx))  # with default parameters
        expected.setdefault(json.dumps(a, sort_keys=True), []).append(name)
    assert {"uniform:ibert", "uniform:fqvit", "uniform:ivit", "sqnr_diff"} <= set(default_warm_starts())
    n_warm = len(expected)
    _, study, info = search(base, tmp_path, objectives="cost", n_trials=n_warm + 3)
    trials = study.trials
    assert len(trials) == n_warm + 3
    for t in trials[:n_warm]:  # the deduplicated uniform and greedy assignments, in registry order
        assert t.user_attrs["warm_start"] == "+".join(expected[json.dumps(t.params, sort_keys=True)])
    assert [t.user_attrs["warm_start"].split("+")[0] for t in trials[:3]] == \
        ["uniform:ibert", "uniform:fqvit", "uniform:ivit"]
    assert trials[1].params == uniform_assignment("fqvit", ctx.slot_ops)
    assert all("warm_start" not in t.user_attrs for t in trials[n_warm:])
    best = min(t.value for t in trials[:n_warm])
    assert study.best_value <= best  # it can only improve on the warm starts
    assert info["trials"] == {"COMPLETE": n_warm + 3}


def test_proxy_study_is_reproducible_with_a_seed(base, tmp_path):
    runs = []
    for i in range(2):
        assignment, study, _ = search(base, tmp_path / f"r{i}", n_trials=3, warm_start="uniform:ivit")
        runs.append((assignment, [(t.params, t.value) for t in study.trials]))
    assert runs[0] == runs[1]
    params = [p for p, _ in runs[0][1]]
    assert params[0] == uniform_assignment("ivit", make_ctx(base, tmp_path).slot_ops) and params[1] != params[2]
    assert all(v >= 0 and math.isfinite(v) for _, v in runs[0][1])  # KL


def test_pareto_front_is_non_dominated(base, tmp_path):
    assignment, study, info = search(base, tmp_path, objectives="proxy,cost", n_trials=5,
                                     warm_start="uniform:ibert,uniform:ivit,sqnr_diff", sampler="nsga2")
    pareto = json.loads((tmp_path / "pareto.json").read_text())
    assert pareto["metrics"] == ["kl", "cost_mop"] and info["pareto_size"] == len(pareto["front"])
    front = [tuple(p["values"].values()) for p in pareto["front"]]
    dominates = lambda a, b: all(x <= y for x, y in zip(a, b)) and a != b  # noqa: E731 (both minimized)
    assert not any(dominates(a, b) for a in front for b in front)
    for t in study.trials:  # every other trial is dominated by (or equal to) a front point
        if t.number not in {p["number"] for p in pareto["front"]}:
            assert any(dominates(f, tuple(t.values)) or f == tuple(t.values) for f in front)
    assert assignment == pareto["front"][0]["slots"]  # the chosen one: the front's lowest KL
    assert pareto["front"][0]["values"]["kl"] == min(f[0] for f in front)


def test_journal_storage_resumes(base, tmp_path):
    url = f"journal:{tmp_path / 'journal.log'}"
    _, study, _ = search(base, tmp_path / "a", objectives="cost", n_trials=3, storage=url, warm_start="none")
    assert len(study.trials) == 3
    _, study, info = search(base, tmp_path / "b", objectives="cost", n_trials=5, storage=url, warm_start="none")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 5 and not info["created_by_this_worker"]


def test_threads_finish_the_exact_budget(base, tmp_path):
    _, study, _ = search(base, tmp_path, objectives="cost", n_trials=9, n_jobs=3, sampler="random")
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 9
    assert all(t.user_attrs.get("surplus") for t in study.trials if t.state.name != "COMPLETE")


# --- objectives ----------------------------------------------------------------------------------

def test_cost_table_default_and_override(base, tmp_path):
    ctx = make_ctx(base, tmp_path)
    cost = CostObjective()
    cost.setup(ctx)
    elems, rows = cost.geometry["blocks.0.attn.softmax"]
    assert (elems, rows) == (3 * 50 * 50, 3 * 50)  # 3 heads, 49 patches + class token
    assert cost.geometry["blocks.0.norm1"] == (50 * 192, 50)
    ivit = uniform_assignment("ivit", ctx.slot_ops)
    base_cost = cost.evaluate(ivit, ctx)
    # by hand: the same sum from the table
    by_hand = sum(e * method_cost(cost.table, ctx.slot_ops[s], "ivit")[0] + r * method_cost(cost.table, ctx.slot_ops[s], "ivit")[1]
                  for s, (e, r) in cost.geometry.items()) / 1e6
    assert base_cost == pytest.approx(by_hand)
    override = tmp_path / "table.json"
    override.write_text(json.dumps({"weights": {"div": 0}, "methods": {"softmax": {"ivit": {"element": {"add": 100}}}}}))
    cheap = CostObjective(override)
    cheap.geometry = cost.geometry
    assert cheap.table["weights"]["div"] == 0 and cheap.table["weights"]["mul"] == cost.table["weights"]["mul"]
    assert cheap.table["methods"]["softmax"]["ivit"]["element"]["add"] == 100
    assert cheap.table["methods"]["softmax"]["ivit"]["element"]["mul"] == cost.table["methods"]["softmax"]["ivit"]["element"]["mul"]
    extra_add = 12 * elems * (100 - cost.table["methods"]["softmax"]["ivit"]["element"]["add"])
    no_div = sum(e * cost.table["methods"][ctx.slot_ops[s]]["ivit"]["element"]["div"]
                 + r * cost.table["methods"][ctx.slot_ops[s]]["ivit"]["row"]["div"]
                 for s, (e, r) in cost.geometry.items()) * cost.table["weights"]["div"]
    assert cheap.evaluate(ivit, ctx) == pytest.approx(base_cost + (extra_add - no_div) / 1e6)


@pytest.mark.parametrize("content, message", [
    ("{oops", "not valid JSON"),
    ('{"weigths": {}}', "unknown key in the top level 'weigths' (did you mean 'weights'?)"),
    ('{"weights": {"divide": 3}}', "unknown key in weights 'divide' (did you mean 'div'?)"),
    ('{"weights": {"div": -1}}', "weights.div must be a number >= 0"),
    ('{"methods": {"gelu": {"fqvit": {}}}}', "unknown key in methods.gelu 'fqvit'"),
    ('{"methods": {"softmx": {}}}', "(did you mean 'softmax'?)"),
    ('{"methods": {"softmax": {"ivit": {"column": {}}}}}', "unknown key in methods.softmax.ivit 'column'"),
    ('{"methods": {"softmax": {"ivit": {"element": {"add": "7"}}}}}', "methods.softmax.ivit.element.add must be a number"),
    ('[1, 2]', "the top level must be a JSON object"),
])
def test_bad_cost_table_is_a_clear_error(tmp_path, capsys, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(UsageError, match=None) as err:
        load_cost_table(bad)
    assert message in str(err.value) and str(bad) in str(err.value)
    # the CLI refuses it in one line, before loading any model, and writes nothing
    code = main(["run", "--strategy", "optuna", "--objective", "qat,cost", "--cost-table", str(bad),
                 "--out", str(tmp_path / "o")])
    err_text = capsys.readouterr().err
    assert code == 2 and message in err_text and len(err_text.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_default_cost_table_covers_every_method():
    table = load_cost_table()
    for op in ("softmax", "gelu", "layernorm"):
        assert set(table["methods"][op]) == set(methods_for(op))
        for m in methods_for(op):
            assert method_cost(table, op, m)[0] > 0


class _FakeTrial:
    """What the qat objective uses of an Optuna trial: report, should_prune, one direction."""

    def __init__(self, prune: bool):
        self.reports, self.prune = [], prune
        self.study = type("S", (), {"directions": [optuna.study.StudyDirection.MAXIMIZE]})()

    def report(self, value, step):
        self.reports.append((step, value))

    def should_prune(self):
        return self.prune


@needs_full_fmnist
def test_qat_objective_uses_held_out_training_images_and_reports(base, tmp_path, monkeypatch):
    _, qmodel, data, _, _ = base
    ctx = make_ctx(base, tmp_path, qat=QATConfig(batch_size=4, lr=1e-4))

    def no_test_split(*args, **kwargs):
        raise AssertionError("the qat objective touched the test split")

    monkeypatch.setattr(data, "eval_batches", no_test_split)
    obj = QATObjective(steps=1, holdout=4)
    trial = _FakeTrial(prune=False)
    top1 = obj.evaluate(uniform_assignment("ivit", ctx.slot_ops), ctx, trial)
    assert 0.0 <= top1 <= 100.0 and top1 * 4 / 100 == pytest.approx(round(top1 * 4 / 100))  # 4 images
    assert trial.reports == [(1, top1)]
    assert qmodel.get_assignment()["blocks.0.norm1"] == "float"  # the shared model is untouched
    with pytest.raises(optuna.TrialPruned):
        obj.evaluate(uniform_assignment("ibert", ctx.slot_ops), ctx, _FakeTrial(prune=True))


def test_qat_objective_options():
    with pytest.raises(UsageError, match="--qat-steps must be positive"):
        QATObjective(steps=0)
    with pytest.raises(UsageError, match="--qat-holdout must be positive"):
        QATObjective(holdout=0)


@pytest.mark.parametrize("name", list_samplers())
def test_samplers_are_seeded(name):
    def draws(seed):
        study = optuna.create_study(sampler=make_sampler(name, seed))
        study.optimize(lambda t: sum(t.suggest_categorical(f"s{i}", ["ibert", "fqvit", "ivit"]) == "ivit"
                                     for i in range(8)), n_trials=4)
        return [t.params for t in study.trials]

    assert draws(3) == draws(3)


# --- options -------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--n-trials", "0"], "--n-trials must be an integer >= 1"),
    (["--objective", "proxy,proxy"], "names an objective twice"),
    (["--objective", "proxy,cost,qat"], "one or two objectives"),
    (["--objective", "prxy"], "unknown objective 'prxy' (did you mean 'proxy'?)"),
    (["--objective", "sqnr_diff"], "unknown objective 'sqnr_diff'"),
    (["--warm-start", "optuna"], "cannot name the optuna strategy"),
    (["--warm-start", "sqnr_dif"], "unknown strategy 'sqnr_dif'"),
    (["--storage", "sqlite//x"], "bad storage URL"),
    (["--qat-eval-every", "0", "--objective", "qat"], "--qat-eval-every must be positive"),
    (["--sampler", "cmaes"], "invalid choice: 'cmaes'"),
    (["--timeout", "-1"], "--timeout must be positive"),
    (["--grace", "0"], "--grace must be an integer >= 1"),
])
def test_bad_search_options_exit_2_in_one_line(tmp_path, capsys, args, message):
    code = main(["run", "--strategy", "optuna", *args, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_search_flags_need_the_optuna_strategy(tmp_path, capsys):
    code = main(["run", "--strategy", "sqnr_diff", "--n-trials", "5", "--out", str(tmp_path / "o")])
    assert code == 2 and "--n-trials applies only to --strategy optuna" in capsys.readouterr().err


def test_options_round_trip():
    opts = SearchOptions.from_dict({"objectives": "qat, cost", "warm_start": "none", "n_trials": 7})
    assert opts.objectives == ("qat", "cost") and opts.warm_start == () and opts.n_trials == 7
    assert SearchOptions.from_dict(opts.to_dict()) == opts
    with pytest.raises(UsageError, match="unknown search option 'n_trial'"):
        SearchOptions.from_dict({"n_trial": 3})


@pytest.mark.parametrize("name", ["proxy", "proxy_sqnr"])
def test_proxy_objectives_equal_a_fresh_calibration_trial_after_trial(base, tmp_path, name):
    """The incremental evaluator behind the proxy objectives gives the value of a freshly calibrated
    copy, whatever the previous trial was (methods, a method parameter, a later slot only)."""
    import random

    import torch

    from mnq_search.space import SearchSpace

    model, qmodel, *_ = base
    ctx = make_ctx(base, tmp_path)
    ctx.settings.val_size = 6
    obj = get_objective(name)()
    space = SearchSpace.of_slots(qmodel.slot_ops())
    rng = random.Random(3)
    trials = [uniform_assignment("ibert", qmodel.slot_ops()), uniform_assignment("ivit", qmodel.slot_ops())]
    trials += [space.random(rng) for _ in range(2)]
    last, final = dict(trials[-1]), list(qmodel.slot_ops())[-1]  # then only the last slot changes
    last[final] = next(m for m in methods_for(qmodel.slot_ops()[final]) if m != last[final])
    trials.append(space.complete(last))
    with torch.inference_mode():
        model.eval()
        ref = torch.cat([model(x).double() for x, _ in ctx.validation_batches(6)])
    for a in trials:
        got = obj.evaluate(a, ctx)
        fresh = ctx.calibrated(dict(a))
        fresh.eval()
        with torch.inference_mode():
            quant = torch.cat([fresh(x).double() for x, _ in ctx.validation_batches(6)])
        assert got == obj.compare(ref, quant)


def test_a_study_made_for_another_space_or_budget_is_not_joined():
    from types import SimpleNamespace

    from mnq_search.search._study import StudySpec, _check_compatible

    meta = {"objectives": ["proxy"], "bits": 8, "nl_bits": 8, "fine_grid": False, "slot_ops": {"s": "gelu"},
            "budget": None, "space": {"s": ["ibert", "ivit"], "fc1@groups": [1, 4]}}
    study = SimpleNamespace(study_name="x", user_attrs={"mnq_search": meta},
                            directions=[SimpleNamespace(name="MINIMIZE")])

    def spec(**changes):
        return StudySpec("x", ["minimize"], ["kl"], {**meta, **changes})

    _check_compatible(study, spec())
    with pytest.raises(UsageError, match="another search space"):
        _check_compatible(study, spec(space={"s": ["ibert", "ivit"], "fc1@groups": [1, 8]}))
    with pytest.raises(UsageError, match="budget"):
        _check_compatible(study, spec(budget="w6a6"))
    old = SimpleNamespace(study_name="x", user_attrs={"mnq_search": {k: v for k, v in meta.items() if k != "space"}},
                          directions=study.directions)
    _check_compatible(old, spec())  # a study from before the space was recorded: joined as before


def test_warm_start_file_values_outside_the_space_are_an_error(base, tmp_path):
    from mnq_search.plan import save_assignment
    from mnq_search.space import SearchSpace
    from strategies.optuna_joint import warm_starts

    model, qmodel, *_ = base
    ctx = make_ctx(base, tmp_path)
    ctx.space = SearchSpace.from_model(qmodel, kinds=("method", "param", "groups"), groups=(1, 4))
    a = uniform_assignment("ibert", qmodel.slot_ops())
    save_assignment(tmp_path / "ok.json", {**a, "blocks.0.mlp.fc1@groups": 4, "head@bits": 6})
    (got, names), = warm_starts(ctx, [str(tmp_path / "ok.json")])
    assert got["blocks.0.mlp.fc1@groups"] == 4 and got["blocks.1.mlp.fc1@groups"] == 1 and "head@bits" not in got
    save_assignment(tmp_path / "bad.json", {**a, "blocks.0.mlp.fc1@groups": 8})
    with pytest.raises(UsageError, match="not a choice of 'blocks.0.mlp.fc1@groups'"):
        warm_starts(ctx, [str(tmp_path / "bad.json")])
