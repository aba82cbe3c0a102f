"""Large-model inputs: a transformers model directory (config.json + *.safetensors) and
.safetensors + --module, compiled in bounded memory (weights memory-mapped, see
rewrite/mapped_safetensors.py). Bad directories: one line, exit 2, no OUT."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from .conftest import assert_user_error, run_cli

transformers = pytest.importorskip("transformers")


def _tiny_qwen2(path, layers=2):
    cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2") / "tiny-qwen2"
    _tiny_qwen2(path)
    return path


def no_out(tmp_path, name="o"):
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith((name, f".{name}"))]
    assert leftovers == [], leftovers


def _copy_dir(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_no_config(tmp_path, qwen_dir):
    d = _copy_dir(qwen_dir, tmp_path / "m")
    (d / "config.json").unlink()
    assert_user_error(run_cli("compile", d, "-b", "ort", "-o", tmp_path / "o"), "no config.json")
    no_out(tmp_path)


def test_no_weights(tmp_path, qwen_dir):
    d = _copy_dir(qwen_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    assert_user_error(run_cli("compile", d, "-b", "ort", "-o", tmp_path / "o"), "no *.safetensors")
    no_out(tmp_path)


def test_truncated_weights(tmp_path, qwen_dir):
    d = _copy_dir(qwen_dir, tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_user_error(run_cli("compile", d, "-b", "ort", "-o", tmp_path / "o"), "model.safetensors", "outside")
    no_out(tmp_path)


def test_garbage_header(tmp_path, qwen_dir):
    d = _copy_dir(qwen_dir, tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert_user_error(run_cli("compile", d, "-b", "ort", "-o", tmp_path / "o"), "unreadable safetensors header")
    no_out(tmp_path)


def test_bad_config_json(tmp_path, qwen_dir):
    d = _copy_dir(qwen_dir, tmp_path / "m")
    (d / "config.json").write_text("{ broken")
    assert_user_error(run_cli("compile", d, "-b", "ort", "-o", tmp_path / "o"), "not valid JSON")
    no_out(tmp_path)


def test_weights_of_another_config(tmp_path, qwen_dir):
    d = _copy_dir(qwen_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    assert_user_error(run_cli("compile", d, "-b", "ort", "-o", tmp_path / "o"), "do not fit the model's shapes")
    no_out(tmp_path)


def test_missing_shard(tmp_path, qwen_dir):
    d = _copy_dir(qwen_dir, tmp_path / "m")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model.safetensors"}}))
    assert_user_error(run_cli("compile", d, "-b", "ort", "-o", tmp_path / "o"), "lacks shard")
    no_out(tmp_path)


def test_safetensors_without_module(tmp_path, qwen_dir):
    assert_user_error(run_cli("compile", qwen_dir / "model.safetensors", "-b", "ort", "-o", tmp_path / "o"),
                      "weights only", "--module")
    no_out(tmp_path)


def _initializers(path):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


@pytest.mark.parametrize("passes", ["", "quantize(bits=4,group=128)", "quantize(bits=4,group=32,method=gptq)"])
def test_bounded_path_gives_the_in_memory_artifact(tmp_path, passes):
    """A 3-layer model through the bounded-memory path (model directory: weights mapped and
    shared, recorded reference) and through the in-memory path (the same module captured
    from memory): bit-identical ONNX weights, and the same verification numbers."""
    import gradrewrite as gr
    from gradrewrite.rewrite.capture import capture, load_model

    d = tmp_path / "m"
    model = _tiny_qwen2(d, layers=3)
    model.config.use_cache = False   # as the directory loader sets it: logits only
    bounded = load_model(d)
    assert "mapped_weights" in bounded.meta
    in_memory = capture(model, bounded.example_inputs)
    gen = torch.Generator().manual_seed(3)   # GPTQ: layer-wise calibration on both paths
    calib = [(torch.randint(0, 512, (1, 16), generator=gen),) for _ in range(4)] if "gptq" in passes else None
    opts = dict(backend="ort", passes=passes or None, latency_runs=0, calibration=calib)
    a = gr.compile(bounded, tmp_path / "bounded", **opts)
    b = gr.compile(in_memory, tmp_path / "memory", **opts)
    wa, wb = _initializers(a.path / "model.onnx"), _initializers(b.path / "model.onnx")
    assert sorted(wa) == sorted(wb)
    for name in wa:
        assert wa[name].dtype == wb[name].dtype and np.array_equal(wa[name], wb[name]), name
    assert a.report["memory"]["weights"].startswith("memory-mapped")
    assert b.report["memory"]["weights"] == "in memory"
    for key in ("max_abs_error", "relative_error"):
        assert a.report["verification"][key] == b.report["verification"][key]
    ids = bounded.example_inputs[0].numpy()
    np.testing.assert_array_equal(a(ids)[0], b(ids)[0])


def test_model_dir_compiles_from_the_cli(tmp_path, qwen_dir):
    proc = run_cli("compile", qwen_dir, "-b", "ort", "-o", tmp_path / "o", check=True)
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["inputs"] == [{"name": "input_ids", "shape": [1, 16], "dtype": "int64", "high": 512}]
    assert report["verification"]["relative_error"] < 1e-5
    assert report["artifact"]["external_data"] is True
    assert report["memory"]["peak_rss_bytes"] > 0 and report["memory"]["weight_bytes_fp32"] > 0
    assert "wrote" in proc.stdout


FACTORY = textwrap.dedent("""
    import torch

    def mlp():
        layers = []
        for _ in range({layers}):
            layers += [torch.nn.Linear({width}, {width}), torch.nn.ReLU()]
        return torch.nn.Sequential(*layers)
""")


def test_large_weights_compile_in_bounded_memory(tmp_path):
    """A subprocess compiling 512 MiB of fp32 weights (.safetensors + --module) to ORT peaks
    below 2x the weights + 1 GiB (the imported libraries): the in-memory path holds the
    weights ~5 times over. A behaviour check with a generous margin, not a timing test."""
    from safetensors.torch import save_file

    layers, width = 8, 4096
    (tmp_path / "big_mlp.py").write_text(FACTORY.format(layers=layers, width=width))
    gen = torch.Generator().manual_seed(0)
    weights = {}
    for i in range(layers):
        weights[f"{2 * i}.weight"] = torch.randn(width, width, generator=gen) * 0.02
        weights[f"{2 * i}.bias"] = torch.zeros(width)
    save_file(weights, str(tmp_path / "mlp.safetensors"))
    weight_bytes = sum(t.numel() * 4 for t in weights.values())
    del weights
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=f"{tmp_path}{os.pathsep}" + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "gradrewrite", "compile", str(tmp_path / "mlp.safetensors"),
                           "--module", "big_mlp:mlp", "--input", f"1x{width}", "-b", "ort", "-o", str(tmp_path / "o"),
                           "--quiet"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    memory = json.loads((tmp_path / "o" / "report.json").read_text())["memory"]
    assert memory["weight_bytes_fp32"] == weight_bytes
    assert memory["peak_rss_bytes"] < 2 * weight_bytes + (1 << 30), memory
