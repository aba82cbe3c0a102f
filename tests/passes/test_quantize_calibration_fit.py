"""How weight-only quantization fits calibration data: padded tokens left out of the
statistics (``padding_mask``), and GPTQ's dampening chosen by cross-validation
(``damp=auto``). Structure, numerics on held-out data, options."""
from __future__ import annotations

import pytest
import torch

from gradrewrite.compiler import run_pipeline
from gradrewrite.errors import ConfigError
from gradrewrite.passes.quantize.gptq import DAMP_CANDIDATES, choose_damp, gptq_quantize, layer_hessian
from gradrewrite.passes.quantize.layers import find_layers, layer_input
from gradrewrite.passes.quantize.padding import PaddingRows, resolve
from gradrewrite.rewrite.capture import capture
from gradrewrite.rewrite.registry import PassContext
from tests.model_zoo import hf_bert

D = 64


class PaddedEncoder(torch.nn.Module):
    """Token embedding -> linear, output zeroed where the mask is 0 (as pooling / attention
    would). The padding token's embedding is large and points its own way, so a Hessian
    that counts padded rows is dominated by a direction the real tokens never take."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Embedding(32, D)
        self.fc = torch.nn.Linear(D, 96)
        with torch.no_grad():
            basis = torch.randn(4, D, generator=g)
            self.emb.weight.copy_(torch.randn(32, 4, generator=g) @ basis + 0.05 * torch.randn(32, D, generator=g))
            self.emb.weight[0] = 30.0 * torch.randn(D, generator=g)          # the padding token
            self.fc.weight.copy_(torch.randn(96, D, generator=g) / D ** 0.5)

    def forward(self, input_ids, attention_mask):
        return self.fc(self.emb(input_ids)) * attention_mask.unsqueeze(-1).to(torch.float32)


def _padded_batches(n, seed, batch=4, seq=16):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 32, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.int64)
        for b in range(batch):
            n_real = int(torch.randint(4, seq - 4, (1,), generator=g))
            mask[b, n_real:] = 0
        out.append((torch.where(mask.bool(), ids, torch.zeros_like(ids)), mask))
    return out


@pytest.fixture(scope="module")
def encoder():
    model = PaddedEncoder().eval()
    return model, capture(model, _padded_batches(1, 0)[0])


def _quantize(graph, options, calib):
    q = graph.clone()
    res = run_pipeline(q, f"quantize(mode=weight-only,{options})", verify=False,
                       ctx=PassContext(calibration=calib))
    return q, res.records[-1].report


# ------------------------------------------------------------------------------- structure
def test_auto_finds_the_mask_input(encoder):
    _, graph = encoder
    assert resolve(graph, "auto")[0] == 1
    assert resolve(graph, "off")[0] is None
    assert resolve(graph, "attention_mask")[0] == 1
    model, example = hf_bert()
    assert resolve(capture(model, example), "auto")[0] == 1


def test_rows_keep_only_real_tokens():
    rows = PaddingRows(1)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    v = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    for _ in rows.track([(None, mask)]):
        assert rows.rows(v).tolist() == [[0, 1], [2, 3], [6, 7]]
        assert rows.rows(v.reshape(6, 2)).tolist() == [[0, 1], [2, 3], [6, 7]]   # flattened tokens
        assert rows.rows(torch.ones(2, 5)).shape == (2, 5)                          # other shapes: all rows
    assert rows.current is None and rows.summary("r")["rows_kept_fraction"] == round(8 / 14, 4)


def test_hessian_leaves_out_padded_rows(encoder):
    _, graph = encoder
    calib = _padded_batches(3, 1)
    layers, _ = find_layers(graph, "op:linear", "", kinds=("linear",), what="test")
    x_node = layer_input(layers[0])
    h_all, n_all, _ = layer_hessian(graph, x_node, calib)
    h_real, n_real, halves = layer_hessian(graph, x_node, calib, padding=PaddingRows(1))
    real = sum(int(m.sum()) for _, m in calib)
    assert n_all == 3 * 4 * 16 and n_real == real
    x = torch.cat([graph.gm.emb.weight[ids][m.bool()] for ids, m in calib]).double()   # the real rows
    torch.testing.assert_close(h_real, 2 * x.T @ x / real)
    assert sum(r for _, r in halves) == real and all(r > 0 for _, r in halves)
    assert float(torch.diagonal(h_all).mean()) > 10 * float(torch.diagonal(h_real).mean())


def test_report_says_what_was_masked(encoder):
    _, graph = encoder
    _, report = _quantize(graph, "bits=4,group=32,method=gptq", _padded_batches(4, 1))
    assert report["padding"]["input_used"] and "attention_mask" in report["padding"]["input_used"]
    assert 0.2 < report["padding"]["rows_kept_fraction"] < 0.8
    _, report = _quantize(graph, "bits=4,group=32,method=gptq,padding_mask=off", _padded_batches(4, 1))
    assert report["padding"]["input_used"] is None and report["padding"]["rows_kept_fraction"] == 1.0


def test_options_are_checked(encoder):
    _, graph = encoder
    for options, needle in [("padding_mask=labels", "not a model input"),
                            ("method=gptq,damp=lots", "damp='lots' is not a number"),
                            ("method=gptq,damp=2", "damp=2")]:
        with pytest.raises(ConfigError, match=needle):
            run_pipeline(graph.clone(), f"quantize(mode=weight-only,bits=4,{options})",
                         ctx=PassContext(calibration=_padded_batches(2, 1)))


# ------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("method", ["gptq", "awq-gptq"])
def test_masked_calibration_fits_real_tokens_better(encoder, method):
    model, graph = encoder
    calib, held = _padded_batches(6, 1), _padded_batches(6, 2)
    errs = {}
    for opt in ("auto", "off"):
        q, _ = _quantize(graph, f"bits=3,group=32,method={method},damp=0.01,padding_mask={opt}", calib)
        with torch.no_grad():
            num = sum(float((q(*b)[0] - model(*b)).norm() ** 2) for b in held)
            den = sum(float(model(*b).norm() ** 2) for b in held)
        errs[opt] = (num / den) ** 0.5
    print(f"{method} 3-bit held-out output error on real tokens: masked {errs['auto']:.4f} "
          f"unmasked {errs['off']:.4f}")
    assert errs["auto"] < 0.8 * errs["off"], errs


def _low_rank_rows(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(12, k, generator=torch.Generator().manual_seed(5))
    return torch.randn(n, 12, generator=g) @ basis + torch.randn(n, k, generator=g)


def _hessians(x):
    h = lambda r: 2 * r.double().T @ r.double() / r.shape[0]
    half = x.shape[0] // 2
    return h(x), [(h(x[:half]), half), (h(x[half:]), x.shape[0] - half)]


def test_auto_damp_damps_more_when_data_are_few():
    k = 128
    w = torch.randn(64, k, generator=torch.Generator().manual_seed(1)) / k ** 0.5
    picks = {}
    for n in (96, 8192):
        h, halves = _hessians(_low_rank_rows(n, k, n))
        picks[n], errors = choose_damp(w, h, halves, 3, 32)
        assert set(errors) == {f"{d:g}" for d in DAMP_CANDIDATES} and min(errors.values()) == 1.0
    print(f"damp chosen: {picks}")
    assert picks[96] > picks[8192]


def test_auto_damp_is_no_worse_on_held_out_rows():
    k = 128
    w = torch.randn(64, k, generator=torch.Generator().manual_seed(1)) / k ** 0.5
    x_fit, x_held = _low_rank_rows(96, k, 3), _low_rank_rows(4096, k, 4)
    h, halves = _hessians(x_fit)
    h_held = 2 * x_held.double().T @ x_held.double() / x_held.shape[0]
    d, _ = choose_damp(w, h, halves, 3, 32)

    def held_error(damp):
        q, _ = gptq_quantize(w, h, 3, 32, damp=damp)
        diff = q.dequantized().double() - w.double()
        return float(((diff @ h_held) * diff).sum())

    e_auto, e_fixed = held_error(d), held_error(0.01)
    print(f"held-out error: auto (damp {d}) {e_auto:.4g}, damp 0.01 {e_fixed:.4g}")
    assert e_auto <= e_fixed


def test_report_records_the_chosen_damp(encoder):
    _, graph = encoder
    _, report = _quantize(graph, "bits=4,group=32,method=gptq", _padded_batches(4, 1))
    g = report["layers"][0]["gptq"]
    assert g["damp"] in DAMP_CANDIDATES and min(g["damp_held_out_error"].values()) == 1.0
    _, report = _quantize(graph, "bits=4,group=32,method=gptq,damp=0.02", _padded_batches(4, 1))
    assert report["layers"][0]["gptq"]["damp"] == 0.02 and "damp_held_out_error" not in report["layers"][0]["gptq"]
