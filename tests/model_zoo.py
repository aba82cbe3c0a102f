"""Tiny Hugging Face ``transformers`` models for tests (helper module, not a test file).

Every function builds a model from a small config with random weights (no download,
deterministic for a given ``seed``, global RNG state left untouched) and returns
``(model.eval(), example_inputs)``. Models are wrapped in a :class:`TensorOutput` subclass so
that ``forward`` takes named positional tensors and returns one plain tensor (``logits`` or
``last_hidden_state``), which keeps ``torch.export`` / ONNX export signatures simple.
KV caches are disabled (``use_cache=False``) and attention uses ``sdpa``.

Import from a test with ``from model_zoo import hf_llama`` (pytest puts ``tests/`` on
``sys.path`` for test files there), or add ``tests/`` to ``sys.path`` first.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = [
    "TensorOutput", "IdsToTensor", "IdsMaskToTensor", "PixelsToTensor",
    "hf_llama", "hf_gpt2", "hf_bert", "hf_mobilenet_v2", "hf_vit", "ZOO",
]

ATTN = "sdpa"


class TensorOutput(nn.Module):
    """Base wrapper: runs the HF model with keyword inputs and returns ``output.<field>``.

    Subclasses give ``forward`` explicit tensor arguments so exported programs and ONNX
    files get meaningful input names (``input_ids``, ``pixel_values``...).
    """

    def __init__(self, model: nn.Module, field: str):
        super().__init__()
        self.model = model
        self.field = field

    def _run(self, **inputs: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(**inputs, return_dict=True), self.field)


class IdsToTensor(TensorOutput):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._run(input_ids=input_ids)


class IdsMaskToTensor(TensorOutput):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._run(input_ids=input_ids, attention_mask=attention_mask)


class PixelsToTensor(TensorOutput):
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._run(pixel_values=pixel_values)


def _build(make: Callable[[], nn.Module], make_inputs: Callable[[torch.Generator], tuple],
           wrapper: type[TensorOutput], field: str, seed: int,
           calibrate: Callable[[nn.Module, torch.Generator], None] | None = None):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed + 1)
        model = make()
        if calibrate is not None:
            calibrate(model, gen)
        inputs = make_inputs(gen)
    return wrapper(model.eval(), field).eval(), inputs


def _ids(vocab: int, seq: int):
    return lambda gen: (torch.randint(0, vocab, (1, seq), generator=gen, dtype=torch.int64),)


def hf_llama(seq: int = 32, seed: int = 0):
    """LlamaForCausalLM (GQA, RoPE, RMSNorm, SiLU MLP): ids ``1 x seq`` -> logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      use_cache=False, attn_implementation=ATTN)
    return _build(lambda: LlamaForCausalLM(cfg), _ids(256, seq), IdsToTensor, "logits", seed)


def hf_gpt2(seq: int = 32, seed: int = 0):
    """GPT2LMHeadModel (Conv1D projections, tied head): ids ``1 x seq`` -> logits."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=256, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                     bos_token_id=255, eos_token_id=255, use_cache=False, attn_implementation=ATTN)
    return _build(lambda: GPT2LMHeadModel(cfg), _ids(256, seq), IdsToTensor, "logits", seed)


def hf_bert(seq: int = 32, seed: int = 0):
    """BertModel encoder: (ids, attention_mask) ``1 x seq`` -> last_hidden_state ``1 x seq x 64``.

    The mask pads out the last quarter of the sequence, so the masking path matters.
    """
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=128, use_cache=False,
                     attn_implementation=ATTN)

    def make_inputs(gen):
        ids = torch.randint(0, 256, (1, seq), generator=gen, dtype=torch.int64)
        mask = torch.ones(1, seq, dtype=torch.int64)
        mask[:, seq - seq // 4:] = 0
        return ids, mask

    return _build(lambda: BertModel(cfg, add_pooling_layer=False), make_inputs,
                  IdsMaskToTensor, "last_hidden_state", seed)


def _calibrate_bn(image_size: int):
    """Random BN affine params and real running stats (shared with the examples)."""
    from examples.models import _calibrate_bn as calibrate, _randomize_bn_affine

    def run(model: nn.Module, gen: torch.Generator) -> None:
        _randomize_bn_affine(model, gen)
        calibrate(model, lambda: torch.randn(4, 3, image_size, image_size, generator=gen),
                  steps=2)
    return run


def hf_mobilenet_v2(image_size: int = 64, seed: int = 0):
    """MobileNetV2ForImageClassification (depth 0.35, TF padding): ``1x3xSxS`` -> logits ``1x10``.

    BatchNorm layers get random affine parameters and running stats from train-mode batches.
    """
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    cfg = MobileNetV2Config(image_size=image_size, depth_multiplier=0.35, num_labels=10)
    return _build(lambda: MobileNetV2ForImageClassification(cfg),
                  lambda gen: (torch.randn(1, 3, image_size, image_size, generator=gen),),
                  PixelsToTensor, "logits", seed, calibrate=_calibrate_bn(image_size))


def hf_vit(image_size: int = 32, seed: int = 0):
    """ViTForImageClassification (patch 8, hidden 64, 2 layers): ``1x3xSxS`` -> logits ``1x10``."""
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=image_size, patch_size=8, num_channels=3, hidden_size=64,
                    num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                    num_labels=10, attn_implementation=ATTN)
    return _build(lambda: ViTForImageClassification(cfg),
                  lambda gen: (torch.randn(1, 3, image_size, image_size, generator=gen),),
                  PixelsToTensor, "logits", seed)


ZOO: dict[str, Callable[[], tuple[nn.Module, tuple]]] = {
    "hf_llama": hf_llama,
    "hf_gpt2": hf_gpt2,
    "hf_bert": hf_bert,
    "hf_mobilenet_v2": hf_mobilenet_v2,
    "hf_vit": hf_vit,
}
