"""Training-step capture: one graph, gradients equal torch.autograd, names by path."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from gradrewrite.errors import InputError
from gradrewrite.rewrite.graph import module_path
from gradrewrite.rewrite.train_step import apply_step, capture_train_step, role


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6(inplace=True),
                                      nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU())
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)


def reference(model, x, y, loss="cross_entropy"):
    out = model(x)
    l = nn.functional.cross_entropy(out, y) if loss == "cross_entropy" else nn.functional.mse_loss(out, y)
    names = [n for n, _ in model.named_parameters()]
    return l, dict(zip(names, torch.autograd.grad(l, list(model.parameters()))))


def test_gradients_and_update_match_autograd():
    torch.manual_seed(0)
    model = Net()
    x, y = batch()
    g = capture_train_step(model, "cross_entropy", (x, y), lr=0.05)
    ts = g.meta["train_step"]
    assert ts["outputs"][0] == "loss" and set(ts["outputs"][1:]) == set(dict(model.named_parameters()))
    out = g(*batch(1))          # fresh data: the graph is not specialised to the example
    loss, grads = reference(model, *batch(1))
    assert torch.allclose(out[0], loss, rtol=1e-5, atol=1e-6)
    params = dict(model.named_parameters())
    for what, new in zip(ts["outputs"][1:], out[1:]):
        expected = params[what].detach() - 0.05 * grads[what]
        assert torch.allclose(new, expected, rtol=1e-5, atol=1e-6), what


def test_names_roles_and_module_paths():
    g = capture_train_step(Net(), "cross_entropy", batch(), lr=0.1)
    names = {n.name for n in g.graph.nodes}
    assert "features_0_weight_grad" in names and "head_bias_new" in names
    assert not any(n.startswith("primals") for n in names)
    roles = {role(n) for n in g.call_nodes()}
    assert {"forward", "loss", "backward", "update"} <= roles
    grad = next(n for n in g.graph.nodes if n.name == "features_0_weight_grad")
    assert grad.meta["param"] == "features.0.weight" and module_path(grad) == "features.0"
    backward_paths = {module_path(n) for n in g.call_nodes() if role(n) == "backward"}
    assert {"features.0", "features.2", "head"} <= backward_paths
    info = g.meta["train_step"]["params"]["head.weight"]
    assert info == {**info, "trained": True, "shape": [5, 8], "grad": "head_weight_grad"}
    assert g.meta["training"] is True


def test_steps_train_and_momentum_matches_torch_sgd():
    torch.manual_seed(0)
    model = Net()
    ref = Net()
    ref.load_state_dict(model.state_dict())
    g = capture_train_step(model, "cross_entropy", batch(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        x, y = batch(step)
        loss = apply_step(g, g(x, y))
        opt.zero_grad()
        ref_loss = nn.functional.cross_entropy(ref(x), y)
        ref_loss.backward()
        opt.step()
        assert torch.allclose(loss, ref_loss.detach(), rtol=1e-5, atol=1e-6)
    for name, p in ref.named_parameters():
        assert torch.allclose(g.attr(name), p.detach(), rtol=1e-4, atol=1e-6), name


def test_mse_loss():
    model = Net()
    x = batch()[0]
    y = torch.randn(4, 5)
    g = capture_train_step(model, "mse", (x, y), lr=0.1)
    out = g(x, y)
    loss, _ = reference(model, x, y, "mse")
    assert torch.allclose(out[0], loss, rtol=1e-5)


class NoBackward(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x):  # igamma and zeta have no derivative w.r.t. their first input
        h = torch.igamma(self.a(x).abs() + 1, torch.ones(()))
        return self.b(torch.special.zeta(h + 1, torch.ones(())))


def test_bad_inputs():
    with pytest.raises(InputError, match="unknown loss"):
        capture_train_step(Net(), "hinge", batch())
    with pytest.raises(InputError, match="learning rate"):
        capture_train_step(Net(), "cross_entropy", batch(), lr=0)
    with pytest.raises(InputError, match="optimizer"):
        capture_train_step(Net(), "cross_entropy", batch(), optimizer="adam")


def test_ops_without_backward_are_named_together():
    with pytest.raises(InputError, match="igamma.*zeta") as exc:
        capture_train_step(NoBackward(), "cross_entropy", (torch.randn(2, 4), torch.tensor([0, 1])))
    assert "2 op(s)" in str(exc.value)
