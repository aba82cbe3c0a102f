"""Build the example models and save them as torch.export programs (.pt2).

Usage::

    python examples/make_models.py [--out examples/models]

Writes ``small_cnn.pt2``, ``mobilenet_v2.pt2`` and ``tiny_gpt.pt2`` (the example
inputs travel inside each file: ``torch.export.load(p).example_inputs``) and
``small_cnn.onnx`` (legacy TorchScript exporter, opset 17) for ONNX-input demos.
Models are built with a fixed seed, so the files are reproducible.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _load_models_module():
    # Load examples/models.py by path: works whatever the current directory is and
    # cannot be shadowed by the examples/models/ output folder or another "models".
    spec = importlib.util.spec_from_file_location("gradrewrite_examples_models", HERE / "models.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _fmt_size(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "models", help="output folder (default: examples/models)")
    parser.add_argument("--seed", type=int, default=0, help="model seed (default: 0)")
    parser.add_argument("--no-onnx", action="store_true", help="skip writing small_cnn.onnx")
    args = parser.parse_args(argv)

    models = _load_models_module()
    args.out.mkdir(parents=True, exist_ok=True)

    for name, factory in models.FACTORIES.items():
        t0 = time.perf_counter()
        model, inputs = factory(seed=args.seed)
        params = models.count_params(model)
        macs = models.count_macs(model, inputs)
        ep = torch.export.export(model, inputs)
        path = args.out / f"{name}.pt2"
        torch.export.save(ep, path)
        dt = time.perf_counter() - t0
        shapes = ", ".join("x".join(map(str, t.shape)) + f" {str(t.dtype).removeprefix('torch.')}" for t in inputs)
        print(f"{name:<13} params={params:>9,}  MACs={macs / 1e6:7.2f}M  input=[{shapes}]  "
              f"{path} ({_fmt_size(path.stat().st_size)})  {dt:.2f}s", flush=True)

        if name == "small_cnn" and not args.no_onnx:
            t0 = time.perf_counter()
            onnx_path = args.out / "small_cnn.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, inputs, str(onnx_path), dynamo=False, opset_version=17,
                                  input_names=["input"], output_names=["logits"])
            dt = time.perf_counter() - t0
            print(f"{'small_cnn':<13} onnx opset=17  {onnx_path} ({_fmt_size(onnx_path.stat().st_size)})  {dt:.2f}s",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
