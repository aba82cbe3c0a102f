"""N:M sparse training rewrites (SR-STE, PGF): gradient formulas, schedules, and
end to end on captured graphs, with every trained parameter's gradient checked
against torch.autograd on the untouched model with the masking applied explicitly."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

import gradrewrite
from gradrewrite.rewrite.nm_masks import check_nm, nm_mask
from gradrewrite.passes.nm_sparsity.training import (
    LayerRef, MaskDecayFunction, NMTrainConfig, NMTrainer, SRSTEFunction, StraightThroughMask,
    default_schedule, finalize, insert_training_rewrites)
from gradrewrite.rewrite.graph import module_path, op_kind


# --------------------------------------------------------------------------- models
class MLP(nn.Module):
    def __init__(self, d_in=16, hidden=16, d_out=8):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean((2, 3)))


def _model(cls, seed=0, **kw):
    torch.manual_seed(seed)
    return cls(**kw)


@pytest.fixture(scope="module")
def mlp_captured():
    model = _model(MLP)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    # capture a copy: the graph shares parameters with the module it was captured from
    return model, gradrewrite.capture(copy.deepcopy(model), (x,))


@pytest.fixture(scope="module")
def cnn_captured():
    model = _model(CNN)
    x = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(0))
    return model, gradrewrite.capture(copy.deepcopy(model), (x,))


def layer_refs(graph, pad=False):
    return [LayerRef(module_path(n), n, n.args[1], op_kind(n), pad=pad)
            for n in graph.call_nodes() if op_kind(n) in ("linear", "conv")]


def setup(captured, cfg, **kw):
    model, graph = captured
    graph = graph.clone()
    trainer = insert_training_rewrites(graph, layer_refs(graph, **kw), cfg)
    return model, graph, trainer


def params(graph):
    return dict(graph.gm.named_parameters())


# --------------------------------------------------------------------------- tier 3: functions
def _wmg(shape=(6, 8), seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen, dtype=torch.float64)
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    mask = nm_mask(w, 2, 4, "linear")
    return w, g, mask


def _grad(fn, w, g):
    w = w.clone().requires_grad_(True)
    out = fn(w)
    grad, = torch.autograd.grad(out, w, g)
    return out.detach(), grad


def test_srste_function_exact():
    w, g, mask = _wmg()
    keep = mask.double()
    lam = 2e-4
    out, grad = _grad(lambda v: SRSTEFunction.apply(v, mask, lam), w, g)
    assert torch.equal(out, w * keep)
    assert torch.equal(grad, g + lam * (1 - keep) * w)
    # lambda = 0 is the plain straight-through estimator
    _, grad0 = _grad(lambda v: SRSTEFunction.apply(v, mask, 0.0), w, g)
    assert torch.equal(grad0, g)


@pytest.mark.parametrize("beta", [1.0, 0.37, 0.0])
def test_mask_decay_function_exact(beta):
    w, g, mask = _wmg(seed=1)
    keep = mask.double()
    scale = keep + beta * (1 - keep)
    out, grad = _grad(lambda v: MaskDecayFunction.apply(v, mask, beta, True), w, g)
    assert torch.equal(out, w * scale)
    assert torch.equal(grad, g)                                   # pass-through
    out, grad = _grad(lambda v: MaskDecayFunction.apply(v, mask, beta, False), w, g)
    assert torch.equal(out, w * scale)
    assert torch.equal(grad, g * scale)                           # chain rule


def test_straight_through_mask_exact():
    w, g, mask = _wmg(seed=2)
    out, grad = _grad(lambda v: StraightThroughMask.apply(v, mask), w, g)
    assert torch.equal(out, w * mask.double())
    assert torch.equal(grad, g)


def test_gradcheck_chain_rule_and_ste_differs():
    w, _, mask = _wmg(shape=(4, 8), seed=3)
    w.requires_grad_(True)
    # the chain-rule variant is the true derivative: gradcheck passes
    assert torch.autograd.gradcheck(lambda v: MaskDecayFunction.apply(v, mask, 0.3, False), (w,))
    # straight-through variants are deliberately not the derivative of their forward
    for fn in (lambda v: MaskDecayFunction.apply(v, mask, 0.3, True),
               lambda v: StraightThroughMask.apply(v, mask),
               lambda v: SRSTEFunction.apply(v, mask, 2e-4)):
        assert not torch.autograd.gradcheck(fn, (w,), raise_exception=False)
    # with a full mask they are the identity, whose derivative they are
    full = torch.ones_like(mask)
    assert torch.autograd.gradcheck(lambda v: StraightThroughMask.apply(v, full), (w,))
    assert torch.autograd.gradcheck(lambda v: SRSTEFunction.apply(v, full, 2e-4), (w,))


# --------------------------------------------------------------------------- schedules
def test_phases_and_linear_beta():
    cfg = NMTrainConfig("pgf-mask", 1, 8, decay="linear", warmup_steps=10, decay_steps=100)
    assert [cfg.phase(t) for t in (0, 9, 10, 109, 110, 500)] == \
        ["dense", "dense", "decay", "decay", "fixed-mask", "fixed-mask"]
    assert cfg.rate() == pytest.approx(0.01)
    assert cfg.beta(9) == 1.0                     # dense: no mask at all
    assert cfg.beta(10) == 1.0                    # tau = 0: beta(0) = 1 exactly
    assert cfg.beta(11) == pytest.approx(0.99)
    assert cfg.beta(60) == pytest.approx(0.5)     # tau = D/2
    assert cfg.beta(109) == pytest.approx(0.01)   # last decay step: 1/D
    assert cfg.beta(110) == 0.0 and cfg.beta(10_000) == 0.0
    fast = NMTrainConfig("pgf-mask", 1, 8, decay="linear", warmup_steps=10, decay_steps=100,
                         decay_rate=0.02)
    assert fast.beta(35) == pytest.approx(0.5)
    assert fast.beta(60) == 0.0 and fast.beta(90) == 0.0   # clamped at 0 inside decay


def test_exp_beta():
    cfg = NMTrainConfig("pgf-mask", 2, 4, decay="exp", warmup_steps=5, decay_steps=200)
    a = math.log(1000) / 200
    assert cfg.rate() == pytest.approx(a)
    assert cfg.beta(4) == 1.0
    assert cfg.beta(5) == 1.0
    assert cfg.beta(105) == pytest.approx(1000 ** -0.5)
    assert cfg.beta(204) == pytest.approx(math.exp(-a * 199))
    assert math.exp(-cfg.rate() * cfg.decay_steps) == pytest.approx(1e-3)   # beta(D) = 1e-3
    assert cfg.beta(205) == 0.0                   # fixed phase
    given = NMTrainConfig("pgf-mask", 2, 4, decay="exp", decay_steps=200, decay_rate=0.1)
    assert given.beta(10) == pytest.approx(math.exp(-1.0))


def test_default_decay_is_exp():
    """exp is the default β decay of both the pass and the training config (the one that
    measured better in benchmarks/nm_sparsity.py; see BENCHMARKS.md)."""
    from gradrewrite.passes.nm_sparsity import NMSparsity

    assert NMTrainConfig("pgf-mask", 2, 4).decay == "exp"
    assert NMSparsity(mode="pgf-mask").train_config().decay == "exp"


def _pass_trainer(captured, spec):
    """The captured graph (a clone) with ``spec``'s training rewrites installed by the pass."""
    _, graph = captured
    graph = graph.clone()
    gradrewrite.run_pipeline(graph, spec, verify=False)
    return graph, graph.gm.nm_trainer


def _exp_beta(tau, decay_steps):
    return math.exp(-math.log(1000) * tau / decay_steps)


def test_default_exp_beta_follows_its_formula(mlp_captured):
    """Structure: with the pass's default decay, beta at clock t is
    exp(-ln(1000) * (t - warmup) / D) in the decay phase, 1 before it and 0 after it, and
    the effective weight is W * (M + beta * (1 - M)) with that beta."""
    warm, d = 2, 10
    graph, trainer = _pass_trainer(
        mlp_captured, f"nm-sparsity(n=2,m=4,mode=pgf-mask,warmup_steps={warm},decay_steps={d})")
    assert trainer.cfg.decay == "exp"
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(7))
    opt = torch.optim.SGD([p for p in graph.gm.parameters() if p.requires_grad], lr=0.05)
    trainer.attach(opt)
    for t in range(warm + d + 1):
        assert trainer.t == t
        if t < warm:
            assert trainer.beta() == 1.0
        elif t < warm + d:
            beta = _exp_beta(t - warm, d)
            assert trainer.beta() == pytest.approx(beta, rel=1e-12)
            assert trainer.history[-1]["step"] == t
            assert trainer.history[-1]["beta"] == pytest.approx(beta, rel=1e-12)
            eff = trainer.effective_weights()
            for layer in trainer.layers.values():
                w = layer.bound_weight.detach()
                keep = layer.mask.to(w.dtype)
                torch.testing.assert_close(eff[layer.path], w * (keep + beta * (1 - keep)),
                                           rtol=1e-6, atol=0)
        else:
            assert trainer.beta() == 0.0
        opt.zero_grad()
        graph.gm(x).square().mean().backward()
        opt.step()
    # the schedule at a few decay times, read straight from the formula
    assert trainer.beta(warm) == 1.0
    assert trainer.beta(warm + d // 2) == pytest.approx(1000 ** -0.5)
    assert trainer.beta(warm + d - 1) == pytest.approx(1000 ** (-(d - 1) / d))


@pytest.mark.parametrize("decay", ["linear", "exp"])
def test_both_decays_end_on_the_exact_nm_mask(mlp_captured, decay):
    """At the end of the decay phase (either decay) beta reaches 0: the forward uses
    exactly W * M with M an n:m mask, and nm-finalize bakes that same mask."""
    warm, d = 1, 6
    graph, trainer = _pass_trainer(
        mlp_captured, f"nm-sparsity(n=2,m=4,mode=pgf-mask,decay={decay},warmup_steps={warm},"
                      f"decay_steps={d})")
    assert trainer.cfg.decay == decay
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(8))
    _train(graph, trainer, x, steps=warm + d - 1)
    # last decay step: pruned weights still flow, scaled by a beta in (0, 1)
    assert trainer.phase() == "decay" and 0.0 < trainer.beta() < 1.0
    eff = trainer.effective_weights()
    for layer in trainer.layers.values():
        w = layer.bound_weight.detach()
        assert bool((eff[layer.path][~layer.mask] != 0).any())
        torch.testing.assert_close(eff[layer.path][~layer.mask], trainer.beta() * w[~layer.mask],
                                   rtol=1e-6, atol=0)
    _train(graph, trainer, x, steps=1)
    assert trainer.t == warm + d and trainer.phase() == "fixed-mask" and trainer.beta() == 0.0
    eff = trainer.effective_weights()
    frozen = {}
    for layer in trainer.layers.values():
        w = layer.bound_weight.detach()
        assert layer.mask_nm == (2, 4) and check_nm(layer.mask, 2, 4, "linear")
        assert torch.equal(eff[layer.path], w * layer.mask.to(w.dtype))
        assert torch.equal(eff[layer.path] != 0, layer.mask)
        frozen[layer.path] = layer.mask.clone()
    trained = graph(x)[0]
    gradrewrite.run_pipeline(graph, "nm-finalize", verify=False)
    torch.testing.assert_close(graph(x)[0], trained, rtol=0, atol=0)
    for path, mask in frozen.items():
        w = params(graph)[path]
        assert torch.equal(w != 0, mask)
        assert torch.equal(graph.meta["nm_sparsity"][path]["mask"], mask)


def test_default_schedules():
    assert default_schedule(1, 8) == ((7, 8), (4, 8), (2, 8), (1, 8))
    assert default_schedule(2, 4) == ((3, 4), (2, 4))
    assert default_schedule(2, 8) == ((7, 8), (4, 8), (2, 8))
    assert default_schedule(1, 16) == ((15, 16), (8, 16), (4, 16), (2, 16), (1, 16))
    assert default_schedule(3, 4) == ((3, 4),)
    assert NMTrainConfig("pgf-structure", 1, 8).stages() == default_schedule(1, 8)


def test_structure_stages():
    cfg = NMTrainConfig("pgf-structure", 1, 8, warmup_steps=5, decay_steps=100)
    expect = {0: None, 4: None, 5: (7, 8), 29: (7, 8), 30: (4, 8), 54: (4, 8), 55: (2, 8),
              79: (2, 8), 80: (1, 8), 104: (1, 8), 105: (1, 8), 1000: (1, 8)}
    assert {t: cfg.structure(t) for t in expect} == expect
    assert cfg.phase(104) == "decay" and cfg.phase(105) == "fixed-mask"
    # stage i active for tau in [i*L, (i+1)*L) with non-integer L = 10/4
    odd = NMTrainConfig("pgf-structure", 1, 8, decay_steps=10)
    assert [odd.stages().index(odd.structure(t)) for t in range(10)] == \
        [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    groups = NMTrainConfig("pgf-structure", 1, 8, decay_steps=8,
                           schedule=((8, 64), (4, 32), (2, 16), (1, 8)))
    assert [groups.structure(t) for t in range(9)] == \
        [(8, 64), (8, 64), (4, 32), (4, 32), (2, 16), (2, 16), (1, 8), (1, 8), (1, 8)]
    # srste / pgf-mask apply the target structure throughout the masked phases
    assert NMTrainConfig("srste", 2, 4, warmup_steps=3).structure(3) == (2, 4)


def test_config_validation():
    with pytest.raises(ValueError, match="method"):
        NMTrainConfig("magnitude", 2, 4)
    with pytest.raises(ValueError, match="end at"):
        NMTrainConfig("pgf-structure", 1, 8, schedule=((7, 8), (4, 8)))
    with pytest.raises(ValueError, match="shorter"):
        NMTrainConfig("pgf-structure", 1, 8, decay_steps=3)
    with pytest.raises(ValueError):
        NMTrainConfig("srste", 4, 4)
    with pytest.raises(ValueError, match="mask_interval"):
        NMTrainConfig("srste", 2, 4, mask_interval=0)
    with pytest.raises(ValueError, match="gradient"):
        NMTrainConfig("pgf-mask", 2, 4, gradient="exact")


def test_stage_group_size_validated(mlp_captured):
    _, graph = mlp_captured
    cfg = NMTrainConfig("pgf-structure", 1, 8, decay_steps=8,
                        schedule=((8, 64), (4, 32), (2, 16), (1, 8)))
    g = graph.clone()
    with pytest.raises(ValueError, match=r"'fc1'.*m=64 of stage 0 \(8:64\)"):
        insert_training_rewrites(g, layer_refs(g), cfg)
    assert not hasattr(g.gm, "nm_trainer") and "pending_training" not in g.meta
    g = graph.clone()          # padding the short groups is allowed
    trainer = insert_training_rewrites(g, layer_refs(g, pad=True), cfg)
    assert trainer.layers["fc1"].mask_nm == (8, 64)
    assert check_nm(trainer.layers["fc1"].mask, 8, 64, "linear")   # 16 < 64: keeps 8


def test_group_size_changes_across_stages():
    model = _model(MLP, d_in=64, hidden=64)
    graph = gradrewrite.capture(model, (torch.randn(2, 64),))
    cfg = NMTrainConfig("pgf-structure", 1, 8, decay_steps=4,
                        schedule=((8, 64), (4, 32), (2, 16), (1, 8)))
    trainer = insert_training_rewrites(graph, layer_refs(graph), cfg)
    opt = torch.optim.SGD(graph.gm.parameters(), lr=0.01)
    trainer.attach(opt)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        opt.zero_grad()
        graph.gm(x).square().mean().backward()
        opt.step()
    assert [h["structure"] for h in trainer.history] == [(8, 64), (4, 32), (2, 16), (1, 8)]
    assert [h["step"] for h in trainer.history] == [0, 1, 2, 3]
    layer = trainer.layers["fc1"]
    assert check_nm(layer.mask, 1, 8, "linear") and trainer.phase() == "fixed-mask"


# --------------------------------------------------------------------------- end to end
def _train(graph, trainer, x, steps, lr=0.05):
    opt = torch.optim.SGD(graph.gm.parameters(), lr=lr)
    handle = trainer.attach(opt)
    for _ in range(steps):
        opt.zero_grad()
        graph.gm(x).square().mean().backward()
        opt.step()
    handle.remove()
    return opt


def test_mlp_srste_end_to_end(mlp_captured):
    model, graph, trainer = setup(mlp_captured, NMTrainConfig(
        "srste", 2, 4, warmup_steps=2, decay_steps=4, mask_interval=2))
    assert graph.meta["pending_training"] == "nm-sparsity"
    assert isinstance(graph.gm.nm_trainer, NMTrainer)
    mods = [n for n in graph.nodes if n.op == "call_module"]
    assert [str(n.target) for n in mods] == ["nm_trainer.layers.fc1", "nm_trainer.layers.fc2"]
    for n in mods:   # rewrites keep the layer's provenance and the weight's value meta
        assert module_path(n) in ("fc1", "fc2") and "stack_trace" in n.meta
        assert tuple(n.meta["val"].shape) == tuple(n.args[0].meta["val"].shape)
    # biases are not rerouted
    for n in graph.call_nodes():
        if op_kind(n) == "linear":
            assert n.args[1].op == "call_module" and n.args[2].op == "get_attr"

    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    before = {k: v.detach().clone() for k, v in params(graph).items()}
    # dense phase: the effective weights are W, the graph computes the original model
    assert trainer.phase() == "dense" and trainer.history == []
    for path, eff in trainer.effective_weights().items():
        assert torch.equal(eff, params(graph)[f"{path}.weight"])
    torch.testing.assert_close(graph(x)[0], model(x), rtol=0, atol=0)

    opt = torch.optim.SGD(graph.gm.parameters(), lr=0.05)
    trainer.attach(opt)
    phases = []
    for step in range(8):
        assert trainer.t == step
        phases.append(trainer.phase())
        opt.zero_grad()
        graph.gm(x).square().mean().backward()
        for name, p in params(graph).items():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        opt.step()
        assert trainer.t == step + 1            # the clock follows optimizer.step()
    assert phases == ["dense"] * 2 + ["decay"] * 4 + ["fixed-mask"] * 2
    for name in ("fc1.bias", "fc2.bias"):       # biases trained, never masked
        assert not torch.equal(params(graph)[name], before[name])
    # masks recomputed at tau = 0 and 2 (mask_interval 2), then frozen
    assert [h["step"] for h in trainer.history] == [2, 4]
    assert trainer.history[0]["mask_change_rate"] == pytest.approx(0.5)   # vs dense
    for h in trainer.history:
        assert h["phase"] == "decay" and h["structure"] == (2, 4) and "beta" not in h
        assert set(h["per_layer"]) == {"fc1", "fc2"}
        assert h["mask_change_rate"] == pytest.approx(sum(h["per_layer"].values()) / 2)
    # fixed phase: effective weights are exactly N:M sparse with the frozen mask
    eff = trainer.effective_weights()
    for layer in trainer.layers.values():
        assert check_nm(eff[layer.path] != 0, 2, 4, "linear")
        assert torch.equal(eff[layer.path] != 0, layer.mask)

    trained = graph(x)[0]
    masks = finalize(graph)
    assert set(masks) == {"fc1", "fc2"}
    assert not any(n.op == "call_module" for n in graph.nodes)
    assert not hasattr(graph.gm, "nm_trainer") and "pending_training" not in graph.meta
    assert not any(k.startswith("nm_trainer") for k in graph.gm.state_dict())
    torch.testing.assert_close(graph(x)[0], trained, rtol=0, atol=0)
    for path, mask in masks.items():
        w = params(graph)[f"{path}.weight"]
        assert check_nm(mask, 2, 4, "linear")
        assert bool((w[~mask] == 0).all())
    # the module the graph was captured from was not touched
    assert torch.equal(model.fc1.weight, before["fc1.weight"])


def test_cnn_pgf_structure_end_to_end(cnn_captured):
    _, graph, trainer = setup(cnn_captured, NMTrainConfig(
        "pgf-structure", 1, 8, warmup_steps=1, decay_steps=8))
    assert set(trainer.layers) == {"conv1", "conv2", "head"}
    x = torch.randn(4, 8, 6, 6, generator=torch.Generator().manual_seed(3))
    _train(graph, trainer, x, steps=11)
    assert trainer.t == 11 and trainer.phase() == "fixed-mask"
    structures = [h["structure"] for h in trainer.history]
    assert structures == [(7, 8)] * 2 + [(4, 8)] * 2 + [(2, 8)] * 2 + [(1, 8)] * 2
    assert [h["step"] for h in trainer.history] == list(range(1, 9))
    # a stage change flips at least the dropped fraction of bits
    assert trainer.history[2]["mask_change_rate"] >= 3 / 8 - 1e-6
    eff = trainer.effective_weights()
    for layer in trainer.layers.values():
        assert check_nm(eff[layer.path] != 0, 1, 8, layer.kind)
    trained = graph(x)[0]
    masks = finalize(graph)
    torch.testing.assert_close(graph(x)[0], trained, rtol=0, atol=0)
    for path, mask in masks.items():
        kind = "linear" if path == "head" else "conv"
        assert check_nm(mask, 1, 8, kind)
        assert bool((params(graph)[f"{path}.weight"][~mask] == 0).all())
        assert torch.equal(mask, trainer.layers[path].mask)    # the frozen mask was baked


def test_pgf_mask_history_and_finalize_mid_decay(mlp_captured):
    _, graph, trainer = setup(mlp_captured, NMTrainConfig(
        "pgf-mask", 2, 4, decay_steps=10, decay="exp"))
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(4))
    _train(graph, trainer, x, steps=3)
    assert [h["step"] for h in trainer.history] == [0, 1, 2, 3]
    assert [h["beta"] for h in trainer.history] == pytest.approx(
        [math.exp(-math.log(1000) / 10 * t) for t in range(4)])
    # finalizing before the fixed phase bakes the final n:m mask of |W|
    expect = trainer.masks()
    masks = finalize(graph)
    for path, mask in masks.items():
        assert torch.equal(mask, expect[path])
        assert torch.equal(params(graph)[f"{path}.weight"] != 0, mask)


def test_state_dict_resume_and_commit(mlp_captured):
    cfg = NMTrainConfig("pgf-mask", 2, 4, warmup_steps=1, decay_steps=3)
    _, graph, trainer = setup(mlp_captured, cfg)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(5))
    _train(graph, trainer, x, steps=5)
    state = graph.gm.state_dict()
    assert int(state["nm_trainer.step"]) == 5
    _, other, fresh = setup(mlp_captured, cfg)
    other.gm.load_state_dict(state)
    assert fresh.t == 5 and fresh.phase() == "fixed-mask"
    for key in trainer.layers:
        assert torch.equal(fresh.layers[key].mask, trainer.layers[key].mask)
        assert fresh.layers[key].mask_nm == (2, 4)
    torch.testing.assert_close(other(x)[0], graph(x)[0], rtol=0, atol=0)
    # Graph.commit (e.g. dce) drops buffers no get_attr reads: the frozen mask survives
    frozen = {k: v.mask.clone() for k, v in trainer.layers.items()}
    graph.commit()
    out = graph(x)[0]
    for key, layer in trainer.layers.items():
        assert torch.equal(layer.mask, frozen[key])
    torch.testing.assert_close(out, other(x)[0], rtol=0, atol=0)


def test_insert_validation(mlp_captured):
    _, graph = mlp_captured
    g = graph.clone()
    refs = layer_refs(g)
    with pytest.raises(ValueError, match="shares its weight"):
        insert_training_rewrites(g, [refs[0], refs[0]], NMTrainConfig("srste", 2, 4))
    with pytest.raises(ValueError, match="kind"):
        insert_training_rewrites(g, [LayerRef("fc1", refs[0].layer_node, refs[0].weight_node,
                                              "embedding")], NMTrainConfig("srste", 2, 4))
    with pytest.raises(ValueError, match="not a multiple of m=32"):
        insert_training_rewrites(g, refs, NMTrainConfig("srste", 1, 32))
    insert_training_rewrites(g, refs, NMTrainConfig("srste", 2, 4))
    with pytest.raises(ValueError, match="already holds"):
        insert_training_rewrites(g, layer_refs(g), NMTrainConfig("srste", 2, 4))


# --------------------------------------------------------------------------- tier 3: graph vs eager
def _effective(cfg, t, mask):
    """The masking of one weight at clock t, written out from the spec."""
    warm, decay = cfg.warmup_steps, cfg.decay_steps
    if t < warm:
        return lambda w: w
    if t >= warm + decay:
        return lambda w: w * mask.to(w.dtype)
    tau = t - warm
    if cfg.method == "srste":
        return lambda w: SRSTEFunction.apply(w, mask, cfg.srste_lambda)
    if cfg.method == "pgf-structure":
        return lambda w: StraightThroughMask.apply(w, mask)
    if cfg.decay == "linear":
        beta = max(0.0, 1.0 - tau / decay)
    else:
        beta = math.exp(-math.log(1000) / decay * tau)
    return lambda w: MaskDecayFunction.apply(w, mask, beta, cfg.gradient == "pass-through")


def _expected_structure(cfg, t):
    tau = t - cfg.warmup_steps
    if cfg.method != "pgf-structure" or tau >= cfg.decay_steps:
        return cfg.n, cfg.m
    stages = cfg.stages()
    return stages[tau * len(stages) // cfg.decay_steps]


CONFIGS = [
    NMTrainConfig("srste", 2, 4, warmup_steps=1, decay_steps=3, srste_lambda=0.5),
    NMTrainConfig("pgf-mask", 2, 4, decay="linear", warmup_steps=1, decay_steps=4),
    NMTrainConfig("pgf-mask", 1, 4, decay_steps=4, decay="exp", gradient="chain-rule"),
    NMTrainConfig("pgf-structure", 1, 8, warmup_steps=1, decay_steps=4),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.method}-{c.decay}-{c.gradient}")
@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_gradients_match_eager(cfg, which, mlp_captured, cnn_captured):
    """Every trained parameter's gradient equals autograd on the untouched model with
    the masking applied explicitly, at every phase and step."""
    captured = mlp_captured if which == "mlp" else cnn_captured
    model, graph, trainer = setup(captured, cfg)
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(6)
    x = (torch.randn(6, 16, generator=gen) if which == "mlp"
         else torch.randn(2, 8, 6, 6, generator=gen))
    opt = torch.optim.SGD(graph.gm.parameters(), lr=0.1)
    trainer.attach(opt)
    seen = set()
    for t in range(cfg.warmup_steps + cfg.decay_steps + 2):
        assert trainer.t == t
        seen.add(trainer.phase())
        # reference: the untouched eager model, fed the graph's current weights
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params(graph).items()}
        subst = dict(leaves)
        for layer in trainer.layers.values():
            name = f"{layer.path}.weight"
            w = leaves[name]
            if trainer.phase() != "dense":
                # the mask the spec prescribes, from the weights the optimizer wrote
                n, m = _expected_structure(cfg, t)
                mask = layer.mask
                assert layer.mask_nm == (n, m)
                if trainer.phase() == "decay":
                    assert torch.equal(mask, nm_mask(w, n, m, layer.kind))
            else:
                mask = None
            subst[name] = _effective(cfg, t, mask)(w)
        probe = torch.randn(6 if which == "mlp" else 2, 8 if which == "mlp" else 4,
                            generator=gen)
        ref = torch.func.functional_call(model, subst, (x,))
        ref_grads = torch.autograd.grad((ref * probe).sum(), list(leaves.values()))

        opt.zero_grad()
        out = graph.gm(x)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        (out * probe).sum().backward()
        for (name, p), g in zip(params(graph).items(), ref_grads):
            torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-6, msg=name)
        opt.step()
    assert seen >= {"decay", "fixed-mask"}


def test_srste_decay_term_reaches_the_weights(mlp_captured):
    """With a zero loss gradient only the SR-STE term moves the pruned weights:
    one SGD step scales them by exactly (1 - lr*lambda)."""
    cfg = NMTrainConfig("srste", 2, 4, decay_steps=10, srste_lambda=0.25)
    _, graph, trainer = setup(mlp_captured, cfg)
    w = params(graph)["fc1.weight"]
    before = w.detach().clone()
    mask = trainer.layers["fc1"].mask.clone()
    opt = torch.optim.SGD([w], lr=0.5)
    trainer.attach(opt)
    x = torch.randn(3, 16)
    (graph.gm(x) * 0).sum().backward()
    opt.step()
    after = w.detach()
    assert torch.equal(after[mask], before[mask])
    torch.testing.assert_close(after[~mask], before[~mask] * (1 - 0.5 * 0.25), rtol=0, atol=1e-7)
