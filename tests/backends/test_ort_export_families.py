"""ONNX export of model families the exporter used to reject (issue 15), and the one-line
error for an op that still has no ONNX lowering."""
from __future__ import annotations

import pytest
import torch

import gradrewrite as gr
from gradrewrite.backends import onnx_export_fixes
from gradrewrite.errors import BackendError

from tests.model_zoo import IdsMaskToTensor, PixelsToTensor

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")


def swin_classifier():
    """SwinForImageClassification, 2 stages of 1 block; init std 0.2 (HF's 0.02 leaves the
    attention nearly uniform and the logits ~0.01) so activations and logits are O(1)."""
    from transformers import SwinConfig, SwinForImageClassification

    cfg = SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                     window_size=4, num_labels=5, initializer_range=0.2, attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = PixelsToTensor(SwinForImageClassification(cfg).eval(), "logits").eval()
        return model, (torch.randn(2, 3, 32, 32),)


def t5_encoder():
    """T5EncoderModel with a padding mask (T5's own init already gives O(1) activations)."""
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, vocab_size=100, d_kv=16,
                   attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = IdsMaskToTensor(T5EncoderModel(cfg).eval(), "last_hidden_state").eval()
        ids = torch.randint(0, 100, (2, 8))
        mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
        return model, (ids, mask)


@pytest.mark.parametrize("factory, attention_layers", [(swin_classifier, 2), (t5_encoder, 2)],
                         ids=["swin", "t5-encoder"])
def test_family_compiles_on_ort_and_verifies(tmp_path, factory, attention_layers):
    model, inputs = factory()
    with torch.no_grad():
        ref = model(*inputs)
    assert 0.3 < ref.abs().max() < 30 and ref.std() > 0.1      # O(1): the check is meaningful
    art = gr.compile(gr.capture(model, inputs), tmp_path / "o", backend="ort")
    v = art.report["verification"]
    assert v["checked"] and v["relative_error"] < 1e-4
    assert art.report["artifact"]["export_fixes"] == {"sdpa-layout": attention_layers}
    assert "Identity" not in art.report["artifact"]["onnx_ops"]     # the layout copy is free
    got, = art(*[t.numpy() for t in inputs])
    assert abs(got - ref.numpy()).max() <= 1e-4 * (1 + abs(ref).max().item())


def test_without_the_fix_the_error_names_op_and_layer(tmp_path, monkeypatch):
    """The failure the sdpa-layout rule removes, kept as a real exporter failure (step 2/3,
    decomposition): the message is one line with the op and the layer, not torch's text."""
    monkeypatch.setattr(onnx_export_fixes, "RULES", ())
    model, inputs = t5_encoder()
    with pytest.raises(BackendError) as e:
        gr.compile(gr.capture(model, inputs), tmp_path / "o", backend="ort")
    msg = str(e.value)
    assert "\n" not in msg and "Next steps" not in msg and "\x1b" not in msg
    assert "aten.view" in msg and "at model.encoder.block.0.layer.0.SelfAttention" in msg
    assert "Cannot view a tensor" in msg and "--backend torch" in msg
    assert list(tmp_path.iterdir()) == []


@torch.library.custom_op("gradrewrite_ort_test::wobble", mutates_args=())
def wobble(x: torch.Tensor) -> torch.Tensor:
    """An op with no ONNX translation (step 3/3 of the export fails on it)."""
    return x * 2


@wobble.register_fake
def _(x):
    return torch.empty_like(x)


class _Wobbly(torch.nn.Module):
    def forward(self, x):
        return wobble(x) + 1


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.blocks = torch.nn.Sequential(torch.nn.ReLU(), _Wobbly())

    def forward(self, x):
        return self.blocks(self.fc(x))


def test_unlowerable_op_names_op_and_module_path(tmp_path):
    g = gr.capture(_Net(), (torch.randn(2, 4),))
    with pytest.raises(BackendError) as e:
        gr.compile(g, tmp_path / "o", backend="ort")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("ONNX export failed at blocks.1 (node wobble): "
                          "no ONNX lowering for gradrewrite_ort_test.wobble;"), msg
    assert list(tmp_path.iterdir()) == []
