"""Instance-aware group quantization wired into converted models (issue 15): the grouped linear and
attention products, their integer paths, the per-channel reference, the group settings of a model,
the cost, the incremental evaluator with groups, and the allocation under a BOP budget."""

from __future__ import annotations

import itertools

import pytest
import timm
import torch
import torch.nn.functional as F

from mnq_search import groups as G
from mnq_search.calibrate import calibrate
from mnq_search.convert import convert_model
from mnq_search.errors import UsageError
from mnq_search.incremental import IncrementalEvaluator
from mnq_search.methods import uniform_assignment
from mnq_search.quant import QLinear, qrange, symmetric_scale
from mnq_search.testing import fresh_kl


def _tiny(kind="vit", bits=4):
    torch.manual_seed(0)
    if kind == "vit":
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7, in_chans=1,
                                  num_classes=10, embed_dim=32, depth=2, num_heads=2).eval()
        shape = (1, 28, 28)
    else:
        model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=2,
                                  in_chans=1, num_classes=10, window_size=4, embed_dim=16, depths=(2, 2),
                                  num_heads=(1, 2)).eval()
        shape = (1, 32, 32)
    q = convert_model(model, bits=bits)
    q.set_assignment(uniform_assignment("ibert", q.slot_ops()))
    return model, q, shape


def _outlier_tokens(gen, b=6, n=9, c=32):
    spread = torch.exp(0.8 * torch.randn(b, 1, c, generator=gen))
    return torch.randn(b, n, c, generator=gen) * spread


def _qlinear(groups, bits=8, c=32, d=12):
    torch.manual_seed(1)
    m = QLinear(torch.nn.Linear(c, d), bits)
    m.set_groups(groups)
    return m


@pytest.mark.parametrize("grad", [False, True])
def test_grouped_linear_is_the_sum_of_group_products(grad):
    gen = torch.Generator().manual_seed(0)
    m = _qlinear(4)
    m.train()
    for _ in range(3):
        m(_outlier_tokens(gen))
    m.eval()
    x = _outlier_tokens(gen)
    with torch.set_grad_enabled(grad):
        y = m(x)
        gq = m.q_group(x)
        w_int, s_w = m.linear.quant_weight()
    # reference: every (instance, channel) dequantized on its group's grid, one float product
    ref = F.linear((gq.q * gq.scale).double(), (w_int * s_w.view(-1, 1)).double())
    s_top = gq.group_scales.max() * s_w
    ref = ref + torch.round(m.linear.bias.double() / s_top.double()) * s_top.double()
    assert y.shape == (6, 9, 12)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    assert gq.group.unique().numel() > 1  # the channels really sit in several groups


def test_grouped_linear_integer_path_is_bit_identical():
    gen = torch.Generator().manual_seed(2)
    m = _qlinear(8)
    m.train()
    m(_outlier_tokens(gen))
    m.eval()
    x = _outlier_tokens(gen)
    with torch.no_grad():
        y = m(x)
    acc_f, y_f = m.partial_sums(x)
    acc_int, y_int = m.partial_sums(x, integer=True)
    assert acc_int.dtype == torch.int64 and acc_int.shape == (8, 6, 9, 12)
    assert torch.equal(acc_f, acc_int.float()) and torch.equal(acc_f, torch.round(acc_f))  # the same integers
    assert torch.equal(y_f, y_int)  # merged into the same bits
    torch.testing.assert_close(y, y_int, rtol=1e-5, atol=1e-5)  # the fake-quant forward, up to float rounding
    # each partial sum only holds its group's channels: the sum over groups is the ungrouped product
    gq = m.q_group(x)
    w_int, _ = m.linear.quant_weight()
    assert torch.equal(acc_int.sum(0), gq.q.long() @ w_int.long().t())


def test_one_group_is_the_per_tensor_layer():
    gen = torch.Generator().manual_seed(3)
    m = _qlinear(1)
    assert m.q_group is None and m.groups == 1
    m.set_groups(4)
    m.set_groups(1)
    assert m.q_group is None
    with pytest.raises(UsageError):
        m.set_groups(33)  # more groups than channels
    with pytest.raises(UsageError):
        m.set_groups(0)
    m.set_groups("channel")
    assert m.groups == "channel"
    del gen


def test_channel_mode_is_static_per_channel():
    gen = torch.Generator().manual_seed(4)
    m = _qlinear("channel", bits=4)
    calib = [_outlier_tokens(gen) for _ in range(2)]
    m.q_group.observer.momentum = None  # running extremes: the reference below
    m.train()
    for x in calib:
        m(x)
    m.eval()
    absmax = torch.stack([x.abs().amax(dim=(0, 1)) for x in calib]).amax(0)
    s = symmetric_scale(absmax, 4)
    x = _outlier_tokens(gen)
    qmin, qmax = qrange(4)
    xq = torch.clamp(torch.round(x / s), qmin, qmax) * s  # no exact .5 ties in random data
    w_int, s_w = m.linear.quant_weight()
    ref = F.linear(xq, w_int * s_w.view(-1, 1)) + m.linear.bias
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


def test_model_group_layers_and_settings():
    _, q, _ = _tiny()
    layers = G.group_layers(q)
    assert list(layers)[:5] == ["blocks.0.attn.qkv", "blocks.0.attn.softmax", "blocks.0.attn.proj",
                                "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    assert len(layers) == 10  # 2 blocks x (4 linears + probabilities); patch embedding and head excluded
    assert set(G.get_groups(q).values()) == {1}
    G.set_groups(q, G.uniform_groups(q, "channel"))
    got = G.get_groups(q)
    assert got["blocks.1.mlp.fc2"] == "channel" and got["blocks.1.attn.softmax"] == 1
    with pytest.raises(UsageError, match="not a group layer"):
        G.set_groups(q, {"head": 2})
    with pytest.raises(UsageError):
        G.set_groups(q, {"blocks.0.attn.softmax": "channel"})
    before = G.get_groups(q)
    with pytest.raises(UsageError):  # checked first: nothing changes
        G.set_groups(q, {"blocks.0.attn.qkv": 2, "blocks.0.mlp.fc1": 1000})
    assert G.get_groups(q) == before


@pytest.mark.parametrize("text,expected", [("1", ("uniform", 1)), ("8", ("uniform", 8)), ("channel", ("channel", 1)),
                                           ("alloc:8", ("alloc", 8))])
def test_parse_groups(text, expected):
    s = G.parse_groups(text)
    assert (s.kind, s.groups) == expected and str(s) == text


@pytest.mark.parametrize("text", ["0", "-2", "alloc:1", "alloc:x", "x", "alloc", "8:alloc", ""])
def test_parse_groups_rejects(text):
    with pytest.raises(UsageError, match="--groups"):
        G.parse_groups(text)


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_grouped_model_runs_and_softmax_integer_path(kind):
    model, q, shape = _tiny(kind)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, *shape, generator=gen)
    G.set_groups(q, G.uniform_groups(q, 4))
    calibrate(q, [(x, None)])
    with torch.no_grad():
        y = q(x)
    assert y.shape == (4, 10) and torch.isfinite(y).all()
    # the attention product: integer partial sums equal the float-held ones, merged output identical
    name, (_, attn) = next((n, v) for n, v in G.group_layers(q).items() if v[0] == "softmax")
    p = torch.softmax(torch.randn(2, attn.num_heads, 5, 5, generator=gen) * 3, -1)
    p = torch.round(p * 15) / 15
    v = torch.randint(-7, 8, (2, attn.num_heads, 5, 3), generator=gen).float()
    s_v = torch.tensor(0.05)
    acc_f, y_f = attn.attend_partial_sums(p, v, s_v)
    acc, y_i = attn.attend_partial_sums(p, v, s_v, integer=True)
    assert acc.dtype == torch.int64 and torch.equal(acc_f, acc.float()) and torch.equal(y_f, y_i)
    with torch.no_grad():
        gq = attn.p_group(p)
        y_fake = ((gq.q * gq.scale) @ v) * s_v  # what _attend computes
    torch.testing.assert_close(y_i, y_fake, rtol=1e-5, atol=1e-6)


def test_costs_grow_with_groups_and_channel_is_free():
    _, q, shape = _tiny()
    shapes = G.layer_shapes(q, torch.zeros(2, *shape))
    fc1, attn = shapes["blocks.0.mlp.fc1"], shapes["blocks.0.attn.softmax"]
    assert (fc1.tokens, fc1.channels, fc1.out_features) == (17, 32, 128)  # 16 patches + cls
    assert (attn.tokens, attn.channels, attn.out_features, attn.heads) == (17, 17, 16, 2)
    gemm = 17 * 32 * 128 * 4 * 4
    assert G.layer_cost(fc1, 1) == gemm == G.layer_cost(fc1, "channel")
    costs = [G.layer_cost(fc1, g) for g in G.CANDIDATES]
    assert costs == sorted(costs) and len(set(costs)) == len(costs)
    assert G.total_cost(shapes, {}) == sum(G.layer_cost(s, 1) for s in shapes.values())


def test_evaluator_with_groups_equals_a_fresh_calibration():
    model, q, shape = _tiny()
    gen = torch.Generator().manual_seed(6)
    calib = [torch.randn(8, *shape, generator=gen) for _ in range(2)]
    val = [torch.randn(8, *shape, generator=gen)]
    a = q.get_assignment()
    ev = IncrementalEvaluator(q, model, calib, val)
    ev.score(a)
    for spec in ({"blocks.1.mlp.fc1": 4}, {"blocks.1.mlp.fc1": 4, "blocks.0.attn.softmax": 2}, {"blocks.1.mlp.fc1": 1}):
        full = {name: 1 for name in G.group_layers(q)} | spec
        kl = ev.score(a, groups=full)
        kl_fresh, logits = fresh_kl(q, model, calib, val[0], lambda m, full=full: G.set_groups(m, full))
        assert kl == pytest.approx(kl_fresh, rel=1e-9, abs=1e-12)
        assert torch.equal(ev.logits[0], logits)


def test_allocation_is_the_brute_force_optimum_under_the_budget():
    _, q, shape = _tiny()
    shapes = dict(itertools.islice(G.layer_shapes(q, torch.zeros(1, *shape)).items(), 4))
    gen = torch.Generator().manual_seed(7)
    sens = {name: {g: float(torch.rand(1, generator=gen)) / g for g in (1, 2, 4, 8)} for name in shapes}
    budget = G.total_cost(shapes, {name: 4 for name in shapes})
    alloc = G.allocate_groups(sens, shapes, budget)
    assert alloc.cost <= budget and alloc.cost == G.total_cost(shapes, alloc.groups)
    best = min((sum(sens[n][g] for n, g in zip(shapes, combo)), combo)
               for combo in itertools.product((1, 2, 4, 8), repeat=len(shapes))
               if G.total_cost(shapes, dict(zip(shapes, combo))) <= budget)
    assert alloc.estimated_kl == pytest.approx(best[0])
    with pytest.raises(UsageError):
        G.allocate_groups(sens, shapes, G.total_cost(shapes, {}) - 1)


def test_group_sensitivity_and_allocation_on_a_model():
    model, q, shape = _tiny()
    gen = torch.Generator().manual_seed(8)
    calib = [torch.randn(8, *shape, generator=gen)]
    val = [torch.randn(8, *shape, generator=gen)]
    ev = IncrementalEvaluator(q, model, calib, val)
    shapes = G.layer_shapes(q, calib[0])
    sens = G.group_sensitivity(ev, q.get_assignment(), shapes, candidates=(1, 2, 4))
    assert set(sens) == set(shapes) and all(set(r) == {1, 2, 4} for r in sens.values())
    base = ev.score(q.get_assignment(), groups={n: 1 for n in shapes})
    assert all(r[1] == base for r in sens.values())
    budget = G.total_cost(shapes, {n: 2 for n in shapes})
    alloc = G.allocate_groups(sens, shapes, budget)
    assert alloc.cost <= budget and set(alloc.groups.values()) <= {1, 2, 4}


# --- group counts as search variables (``<layer>@groups``, --joint-groups) ------------------------

def test_group_variables_in_the_space_and_the_assignment():
    from mnq_search.slot import groups_key
    from mnq_search.space import SearchSpace

    _, q, _ = _tiny()
    space = SearchSpace.from_model(q, kinds=("method", "groups"), groups=(1, 4, 64))
    var = space[groups_key("blocks.0.mlp.fc1")]
    assert var.kind == "groups" and var.default == 1 and var.choices == (1, 4)  # fc1 reads 32 channels
    assert space[groups_key("blocks.0.mlp.fc2")].choices == (1, 4, 64)  # fc2 reads 128
    assert space[groups_key("blocks.0.attn.softmax")].choices == (1, 4, 64)
    assert len(space.variables("groups")) == len(G.group_layers(q)) == 10
    a = space.complete(q.get_assignment())  # a methods-only strategy's choice: groups at their defaults
    assert {a[v.name] for v in space.variables("groups")} == {1}
    q.set_assignment({**a, groups_key("blocks.1.mlp.fc2"): 8, groups_key("blocks.0.attn.softmax"): 2})
    got = G.get_groups(q)
    assert got["blocks.1.mlp.fc2"] == 8 and got["blocks.0.attn.softmax"] == 2 and got["blocks.0.mlp.fc1"] == 1
    before = (q.get_assignment(), G.get_groups(q))
    with pytest.raises(UsageError, match="not a group layer"):  # checked first: methods stay too
        q.set_assignment({"blocks.0.mlp.act": "ivit", groups_key("head"): 2})
    with pytest.raises(UsageError, match="must not exceed"):
        q.set_assignment({"blocks.0.mlp.act": "ivit", groups_key("blocks.0.mlp.fc1"): 64})
    assert (q.get_assignment(), G.get_groups(q)) == before
    assert space.sections({groups_key("blocks.1.mlp.fc2"): 8})["layer_groups"] == {groups_key("blocks.1.mlp.fc2"): 8}


def test_assignment_file_round_trip_with_groups(tmp_path):
    from mnq_search.plan import load_assignment, save_assignment
    from mnq_search.slot import groups_key

    _, q, _ = _tiny()
    a = {**q.get_assignment(), groups_key("blocks.0.attn.qkv"): "channel", groups_key("blocks.1.attn.softmax"): 16}
    save_assignment(tmp_path / "a.json", a, bits=4)
    import json

    data = json.loads((tmp_path / "a.json").read_text())
    assert data["layer_groups"] == {"blocks.0.attn.qkv": "channel", "blocks.1.attn.softmax": 16}
    assert "blocks.0.attn.qkv@groups" not in data["slots"]
    back, meta = load_assignment(tmp_path / "a.json", q.slot_ops())
    assert back == a and meta == {"bits": 4}
    data["layer_groups"]["blocks.0.attn.qkv"] = 0
    (tmp_path / "b.json").write_text(json.dumps(data))
    with pytest.raises(UsageError, match="layer_groups"):
        load_assignment(tmp_path / "b.json", q.slot_ops())


def test_evaluator_reads_group_keys_as_groups():
    from mnq_search.slot import groups_key

    model, q, shape = _tiny()
    gen = torch.Generator().manual_seed(9)
    calib = [torch.randn(8, *shape, generator=gen)]
    val = [torch.randn(8, *shape, generator=gen)]
    a = q.get_assignment()
    ev = IncrementalEvaluator(q, model, calib, val)
    spec = {"blocks.1.mlp.fc1": 4, "blocks.0.attn.softmax": 2}
    by_keys = ev.score({**a, **{groups_key(n): g for n, g in spec.items()}})
    ev2 = IncrementalEvaluator(q, model, calib, val)
    assert by_keys == ev2.score(a, groups=spec)
    assert by_keys != ev2.score(a, groups={n: 1 for n in spec})


def test_bops_objective_counts_group_overhead_and_group_budgets():
    from types import SimpleNamespace

    from mnq_search.budget import parse_budget_spec
    from mnq_search.mixprec import layer_bits, layer_macs, total_bops
    from mnq_search.slot import bits_key, groups_key
    from mnq_search.space import SearchSpace
    from objectives import get_objective

    _, q, shape = _tiny(bits=6)
    x = torch.zeros(2, *shape)
    ctx = SimpleNamespace(qmodel=q, device="cpu", calib_batches=lambda: [(x, None)],
                          search_space=SearchSpace.from_model(q, kinds=("method", "bits", "groups")))
    obj = get_objective("bops")()
    obj.setup(ctx)
    a = q.get_assignment()
    weights = total_bops(layer_macs(q), layer_bits(q))
    assert obj.evaluate(a) == pytest.approx(weights / 1e9)  # 1 group everywhere: no overhead
    shapes = G.layer_shapes(q, x)
    spec = {"blocks.0.mlp.fc1": 8, "blocks.1.attn.softmax": 4}
    overhead = sum(G.layer_cost(shapes[n], g) - G.layer_cost(shapes[n], 1) for n, g in spec.items())
    assert overhead > 0
    got = obj.evaluate({**a, **{groups_key(n): g for n, g in spec.items()}})
    assert got == pytest.approx((weights + overhead) / 1e9)
    # a linear's group overhead follows its bit-width in the assignment (the groups' grids)
    at4 = obj.evaluate({**a, groups_key("blocks.0.mlp.fc1"): 8, bits_key("blocks.0.mlp.fc1"): 4})
    at6 = obj.evaluate({**a, groups_key("blocks.0.mlp.fc1"): 8})
    assert at4 < at6
    # w6a6g8: the weight BOPs at 6 bits plus 8 groups at every group layer (a linear: at most its channels)
    assert parse_budget_spec("w6a6g8") == ((6, 6), None, 8) and parse_budget_spec("w6a6").groups is None
    g8 = sum(G.layer_cost(s, 8) - G.layer_cost(s, 1) for s in shapes.values())
    uniform6 = total_bops(layer_macs(q), default=(6, 6))
    assert obj.budget("w6a6g8") == pytest.approx((uniform6 + g8) / 1e9)
    assert obj.budget("w6a6") == pytest.approx(uniform6 / 1e9)
    with pytest.raises(UsageError):
        parse_budget_spec("w6a6g0")


def test_a_failed_score_does_not_leave_stale_activations():
    from mnq_search.slot import bits_key, groups_key

    model, q, shape = _tiny()
    gen = torch.Generator().manual_seed(10)
    calib = [torch.randn(8, *shape, generator=gen)]
    val = [torch.randn(8, *shape, generator=gen)]
    a = q.get_assignment()
    ev = IncrementalEvaluator(q, model, calib, val)
    ev.score(a)
    with pytest.raises(UsageError):  # the bit-width is set, then the group count fails
        ev.score({**a, bits_key("blocks.0.attn.qkv"): 4, groups_key("blocks.0.mlp.fc1"): 1000})
    later = {**a, bits_key("blocks.0.attn.qkv"): 4, groups_key("blocks.1.mlp.fc2"): 4}
    kl = ev.score(later)
    kl_fresh, _ = fresh_kl(q, model, calib, val[0], lambda m: m.set_assignment(later))
    assert kl == pytest.approx(kl_fresh, rel=1e-9, abs=1e-12)
