"""stream-bp structure: op kinds, sequence-axis tracking, layers, the chunk programs."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from examples.models import tiny_gpt
from gradrewrite.passes.stream_bp.attention import chunk_causal_attention
from gradrewrite.passes.stream_bp.seq_axis import CAUSAL, GLOBAL, TOKEN_WISE, track
from gradrewrite.passes.stream_bp import StreamBP, causal_lm_loss
from gradrewrite.rewrite.graph import Graph, module_path, op_name
from gradrewrite.rewrite.registry import PassContext, make_pass

aten = torch.ops.aten


def _export(model, *args):
    ep = torch.export.export(model, args, strict=False)
    return Graph.from_exported_program(ep, args)


def _by_op(gm, name):
    return [n for n in gm.graph.nodes if op_name(n) == name]


def test_tiny_gpt_sequence_axis_through_views_and_transposes():
    model, (ids,) = tiny_gpt(seq=24)
    g = _export(model, ids)
    axes, infos, T = track(g.gm, {"idx": 1})
    assert T == 24
    emb = _by_op(g.gm, "aten.embedding")[0]
    assert axes[emb] == {1: (1, 1)}                      # B x T x D
    view = [n for n in _by_op(g.gm, "aten.view") if len(n.meta["val"].shape) == 4][0]
    assert axes[view] == {1: (1, 1)}                     # B x T x H x hd
    trans = [u for u in view.users if op_name(u) == "aten.transpose.int"][0]
    assert axes[trans] == {2: (1, 1)}                    # B x H x T x hd
    sdpa = _by_op(g.gm, "aten.scaled_dot_product_attention")
    assert len(sdpa) == 2 and all(infos[n].kind == CAUSAL for n in sdpa)
    for n in _by_op(g.gm, "aten.layer_norm") + _by_op(g.gm, "aten.linear") + _by_op(g.gm, "aten.gelu"):
        assert infos[n].kind == TOKEN_WISE, op_name(n)
    out = [n for n in g.gm.graph.nodes if n.op == "output"][0].args[0][0]
    assert axes[out] == {1: (1, 1)}


class Flattening(torch.nn.Module):
    """Rows flattened with the batch (B*T x D) for a matmul, as GPT-2's Conv1D does."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8, 6))

    def forward(self, x):
        b, t, d = x.shape
        y = torch.mm(x.reshape(-1, d), self.w)
        return y.view(b, t, 6).softmax(-1)


def test_flattened_batch_rows_are_tracked():
    g = _export(Flattening(), torch.randn(3, 10, 8))
    axes, infos, _ = track(g.gm, {"x": 1})
    mm = _by_op(g.gm, "aten.mm")[0]
    assert axes[mm] == {0: (3, 1)}                       # 3 batches x T rows
    assert infos[mm].kind == TOKEN_WISE
    out = [n for n in g.gm.graph.nodes if n.op == "output"][0].args[0][0]
    assert axes[out] == {1: (1, 1)}


class Mixers(torch.nn.Module):
    def forward(self, x):
        a = x.cumsum(1)                 # causal
        b = x.mean(dim=1, keepdim=True) # global
        c = F.layer_norm(x, (x.shape[-1],))  # token-wise
        return a + b + c


def test_op_kinds_cumulative_global_tokenwise():
    g = _export(Mixers(), torch.randn(2, 9, 4))
    _, infos, _ = track(g.gm, {"x": 1})
    kinds = {op_name(n): infos[n].kind for n in g.gm.graph.nodes if n.op == "call_function"}
    assert kinds["aten.cumsum"] == CAUSAL
    assert kinds["aten.mean.dim"] == GLOBAL
    assert kinds["aten.layer_norm"] == TOKEN_WISE


def test_layers_found_by_module_path():
    model, (ids,) = tiny_gpt(seq=16, n_layer=3)
    plan = StreamBP(model, chunk=4).plan(ids)
    assert [s.name for s in plan.segments] == ["prologue", "blocks.0", "blocks.1", "blocks.2", "epilogue"]
    # each layer passes exactly one tensor (the residual stream) to the next
    assert all(len(s.outputs) == 1 for s in plan.segments)
    # the LM head and final norm are in the epilogue
    paths = {module_path(n) for n in plan.segments[-1].nodes}
    assert {"model.ln_f", "model.lm_head"} <= paths


def test_chunk_program_slices_and_uses_bottom_right_attention():
    model, (ids,) = tiny_gpt(seq=20)
    plan = StreamBP(model, chunk=6).plan(ids)
    layer = plan.programs[1]
    targets = [n.target for n in layer.main.gm.graph.nodes if n.op == "call_function"]
    assert chunk_causal_attention in targets
    assert aten.scaled_dot_product_attention.default not in targets   # no top-left default
    assert layer.stash and layer.kv is not None                        # keys/values once per layer
    # the layer input is read at rows s:e, the stashed keys/values at rows 0:e
    assert layer.main.boundary_ranges == [("s", "e"), ("0", "e"), ("0", "e")]
    assert layer.kv.boundary_ranges == [("s", "e")]
    # view sizes along the sequence are the chunk length, not the captured 20
    views = [n for n in layer.main.gm.graph.nodes if n.target in (aten.view.default, aten.reshape.default)]
    assert views and all(20 not in n.args[1] for n in views)
    assert any(n.target is operator.sub for n in layer.main.gm.graph.nodes)


def test_chunk_program_rows_equal_full_forward_rows():
    """Numerics: the epilogue program for rows [s, e) gives the logits rows s:e."""
    model, (ids,) = tiny_gpt(seq=20)
    model = model.double()
    sbp = StreamBP(model, chunk=6)
    plan = sbp.plan(ids)
    with torch.no_grad():
        full = model(ids)
        params = dict(sbp.wrapper.named_parameters(remove_duplicate=False))
        values = {}

        def user(prog):
            return [ids for _ in prog.user_inputs]   # the only graph input: input_ids

        for seg, progs in zip(plan.segments[:-1], plan.programs[:-1]):
            if progs.kv is not None:
                kv = progs.kv(0, 20, [values[b] for b in progs.kv.boundary], user(progs.kv),
                              [params[p] for p in progs.kv.params])
                values.update(zip(progs.stash, kv))
            outs = progs.main(0, 20, [values[b] for b in progs.main.boundary], user(progs.main),
                              [params[p] for p in progs.main.params])
            values.update(zip(seg.outputs, outs))
        head = plan.programs[-1].main
        for s, e in [(0, 6), (6, 12), (18, 20)]:
            (rows,) = head(s, e, [values[b][:, s:e] for b in head.boundary], user(head),
                           [params[p] for p in head.params])
            torch.testing.assert_close(rows, full[:, s:e], rtol=1e-12, atol=1e-12)


def test_chunk_attention_is_bottom_right_aligned():
    torch.manual_seed(0)
    q = torch.randn(1, 2, 4, 8, dtype=torch.float64)
    k = torch.randn(1, 2, 10, 8, dtype=torch.float64)
    v = torch.randn(1, 2, 10, 8, dtype=torch.float64)
    out = chunk_causal_attention(q, k, v, 6, 10, 0, 10)
    mask = torch.arange(10)[None, :] <= torch.arange(6, 10)[:, None]   # row i sees 0..6+i
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    top_left = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert not torch.allclose(out, top_left)


class CausalMeanLM(torch.nn.Module):
    """A running mean over the sequence (cumsum / position): causal without attention."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(2))
        self.head = torch.nn.Linear(16, 50)

    def forward(self, ids):
        h = self.emb(ids)
        pos = torch.arange(1, ids.shape[1] + 1, dtype=h.dtype).unsqueeze(-1)
        for layer in self.layers:
            h = h + torch.tanh(layer(h)).cumsum(1) / pos
        return self.head(h)


def test_cumulative_ops_get_prefix_rows_and_exact_gradients():
    torch.manual_seed(0)
    model = CausalMeanLM().double()
    ids = torch.randint(0, 50, (2, 17))
    loss = causal_lm_loss(model(ids), ids)
    loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    sbp = StreamBP(model, chunk=5)
    sbp.backward(ids)
    for n, p in model.named_parameters():
        assert ((p.grad - ref[n]).norm() / ref[n].norm()).item() < 1e-10, n
    layer = sbp.plan(ids).programs[1].main
    assert ("0", "e") in layer.boundary_ranges            # cumsum needs rows 0:e


def test_registered_pass_reports_layers_and_config():
    model, (ids,) = tiny_gpt(seq=32)
    g = _export(model, ids)
    result = make_pass("stream-bp", {"chunk": "10", "logits_chunk": "8"}).run(g, PassContext())
    assert result.report["layers"] == 2 and result.report["chunks_per_layer"] == 4
    assert g.meta["stream_bp"] == {"chunk": 10, "logits_chunk": 8}
    assert result.report["op_kinds"]["causal"] == 2


def test_registered_pass_refuses_global_op():
    class Pool(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(20, 8)
            self.head = torch.nn.Linear(8, 20)

        def forward(self, ids):
            h = self.emb(ids)
            return self.head(h - h.mean(1, keepdim=True))

    import pytest
    from gradrewrite.errors import PassError

    g = _export(Pool(), torch.randint(0, 20, (1, 8)))
    with pytest.raises(PassError, match=r"aten\.mean\.dim at <root> reduces over the sequence"):
        make_pass("stream-bp", {}).run(g, PassContext())


def test_registered_pass_refuses_a_training_step_graph():
    import pytest
    from gradrewrite.errors import PassError
    from gradrewrite.rewrite.train_step import capture_train_step

    model, (ids,) = tiny_gpt(seq=8, n_layer=1, d_model=16, n_head=2, vocab=32)
    target = torch.zeros(1, 8, 32)
    step = capture_train_step(model, "mse", (ids, target))
    with pytest.raises(PassError, match="training-step graph"):
        make_pass("stream-bp", {}).run(step, PassContext())


def test_registered_pass_refuses_a_model_without_token_input():
    import pytest
    from gradrewrite.errors import PassError

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    g = _export(model, torch.randn(2, 4))
    with pytest.raises(PassError, match="no token input"):
        make_pass("stream-bp", {}).run(g, PassContext())
