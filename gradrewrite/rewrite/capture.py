"""Model capture: any supported model source -> ``Graph``.

Sources, by safety:
- ``.pt2``  a ``torch.export`` program (``torch.export.save``): the safe default; its
  example inputs travel with it.
- ``.onnx`` read with onnx and rebuilt as a torch module (``onnx_import``).
- ``--module pkg.mod:factory``: Python code the user names, returning a module (or a
  ``(module, example_inputs)`` pair).
- ``.pt``/``.pth`` pickled ``nn.Module`` or TorchScript: unpickling runs arbitrary code,
  so pickles load only with ``trust_pickle=True``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import logging
import math
import re
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import InputError
from .dynamic_batch import EXAMPLE_BATCH, FixedBatchError, SpecialisationWatch, dynamic_shapes, trace_batch
from .graph import Graph, InputSpec

_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64,
    "int64": torch.int64, "long": torch.int64, "int32": torch.int32, "int": torch.int32,
    "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
# Inputs may take at most 1/4 of the free memory: capture and verification hold
# activations (several times the inputs) and a few copies of them.
_INPUT_MEMORY_SHARE = 4
_SPEC = re.compile(r"^(?P<shape>(?:b|\d+)(?:x\d+)*)(?::(?P<dtype>[a-z0-9]+))?(?::(?P<high>\d+))?$")


def parse_input_spec(text: str, index: int = 0) -> InputSpec:
    """Parse ``1x3x96x96``, ``1x128:int64`` or ``1x128:int64:30522`` (ints below 30522);
    ``Bx3x96x96``: a dynamic batch (traced at ``EXAMPLE_BATCH``)."""
    m = _SPEC.match(text.strip().lower())
    if not m:
        raise InputError(f"bad --input spec {text!r}",
                         "write SHAPE[:DTYPE[:HIGH]], e.g. 1x3x96x96, Bx3x96x96 (dynamic batch) "
                         "or 1x128:int64:30522")
    dtype_name = m["dtype"] or "float32"
    if dtype_name not in _DTYPES:
        raise InputError(f"unknown dtype {dtype_name!r} in --input {text!r}",
                         f"use one of {', '.join(sorted(set(_DTYPES)))}")
    dims = m["shape"].split("x")
    dynamic = dims[0] == "b"
    shape = tuple(EXAMPLE_BATCH if d == "b" else int(d) for d in dims)
    if any(s == 0 for s in shape):
        raise InputError(f"--input {text!r} has a zero-sized dimension", "give every dimension >= 1")
    return InputSpec(f"input_{index}", shape, _DTYPES[dtype_name],
                     int(m["high"]) if m["high"] else None, dynamic)


def example_from_specs(specs: Sequence[InputSpec], seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(s.random(gen) for s in specs)


def capture(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor],
            source: str = "<module>", *, specs: Sequence[InputSpec] | None = None,
            dynamic_batch: bool | Sequence[bool] = False) -> Graph:
    """Export an ``nn.Module`` (in eval mode) to a ``Graph``.

    ``dynamic_batch``: True makes dim 0 of every input symbolic; a list marks inputs
    one by one (all share one batch size)."""
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"{source} is a {type(model).__name__}, not a torch.nn.Module",
                         "save the model object itself, or use --module pkg.mod:factory")
    try:
        model = model.eval()
    except NotImplementedError:
        pass  # an unlifted torch.export module has no train/eval switch: already inference
    example_inputs = tuple(example_inputs)
    flags = _dynamic_flags(dynamic_batch, example_inputs)
    if any(flags):
        example_inputs = trace_batch(example_inputs, flags, source)
    watch = SpecialisationWatch() if any(flags) else contextlib.nullcontext()
    try:
        with _quiet_torch(), watch:
            ep = torch.export.export(model, example_inputs, strict=False, dynamic_shapes=dynamic_shapes(flags))
    except Exception as exc:  # export errors are long: one line that says what to do
        if any(flags) and (watch.value is not None or "Constraints violated" in str(exc)):
            raise FixedBatchError.from_export(exc, watch, source) from exc
        raise _export_error(exc, source) from exc
    graph = Graph.from_exported_program(ep, example_inputs, source=source, dynamic_batch=any(flags))
    _apply_spec_bounds(graph, specs)
    return graph


def _dynamic_flags(dynamic: bool | Sequence[bool], examples: Sequence[torch.Tensor]) -> list[bool]:
    """Which inputs get a dynamic dim 0 (never a 0-d one)."""
    wanted = [bool(dynamic)] * len(examples) if isinstance(dynamic, bool) else \
        [*map(bool, dynamic), *[False] * (len(examples) - len(dynamic))]
    return [w and isinstance(t, torch.Tensor) and t.dim() > 0 for w, t in zip(wanted, examples)]


@contextlib.contextmanager
def _quiet_torch():
    """torch.export logs graph dumps and guard warnings on failure; the error says enough."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


_RAISED_AT = re.compile(r'The following call raised this error:\s*File "([^"]+)", line (\d+), in \w+\s*\n\s*(.+)')


def _export_error(exc: Exception, source: str) -> InputError:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in text or "not enough memory" in text:
        return InputError(f"ran out of memory capturing {source} at these input shapes",
                          "use smaller --input shapes (the model's activations must fit in memory)")
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    if isinstance(exc, GuardOnDataDependentSymNode) or "data-dependent" in first:
        m = _RAISED_AT.search(text)
        at = f" at {m[1]}:{m[2]} ({m[3].strip()})" if m else ""
        return InputError(f"torch.export could not capture {source}: the model branches on a tensor's "
                          f"value{at}",
                          "a graph must hold for every input: remove the branch or write it with "
                          "torch.cond (run with --debug for torch's trace)")
    return InputError(f"torch.export could not capture {source}: {first}",
                      "check the --input shapes/dtypes match what the model expects "
                      "(run with --debug for the full trace)")


def check_input_memory(specs: Sequence[InputSpec]) -> None:
    """Refuse inputs whose tensors alone take a large share of the free memory, before
    allocating them (a model's activations are a multiple of its inputs)."""
    import psutil

    need = sum(math.prod(s.shape) * torch.empty((), dtype=s.dtype).element_size() for s in specs)
    free = psutil.virtual_memory().available
    if need * _INPUT_MEMORY_SHARE > free:
        shapes = ", ".join(f"{'x'.join(map(str, s.shape))}:{str(s.dtype).removeprefix('torch.')}" for s in specs)
        raise InputError(f"--input {shapes} needs {need / 2**30:.3g} GiB for the inputs alone, with "
                         f"{free / 2**30:.3g} GiB of memory free",
                         "use smaller --input shapes")


def load_model(path: str | Path | None = None, *, module: str | None = None,
               inputs: Sequence[str | InputSpec] = (), trust_pickle: bool = False,
               seed: int = 0, dynamic_batch: bool = False) -> Graph:
    """Load a model file (or build one from ``module="pkg.mod:factory"``) as a Graph.

    ``dynamic_batch``: dim 0 of every input stays symbolic (``Bx…`` input specs mark
    single inputs), so the compiled artifact takes any batch size."""
    specs = [s if isinstance(s, InputSpec) else parse_input_spec(s, i)
             for i, s in enumerate(inputs)]
    check_input_memory(specs)
    dynamic: bool | list[bool] = True if dynamic_batch else [s.dynamic_batch for s in specs]
    if module is not None and path is not None and Path(path).suffix.lower() == ".safetensors":
        return _load_factory_weights(Path(path), module, specs, seed, dynamic)
    if module is not None:
        if path is not None:
            raise InputError("give either a MODEL file or --module, not both",
                             "drop one of them (weights in a .safetensors file go with --module)")
        model, example = _from_factory(module)
        example = _choose_inputs(example, specs, module, seed)
        return capture(model, example, source=f"module {module}", specs=specs, dynamic_batch=dynamic)
    if path is None:
        raise InputError("no model given", "pass a MODEL file or --module pkg.mod:factory")
    path = Path(path)
    if not path.exists():
        raise InputError(f"model file {str(path)!r} does not exist", "check the path")
    if path.is_dir():
        return _load_model_dir(path, specs, seed, dynamic)
    if not path.is_file():
        raise InputError(f"{str(path)!r} is not a file", "pass a .pt2, .onnx, .pt or .pth file")
    if path.stat().st_size == 0:
        raise InputError(f"model file {str(path)!r} is empty", "re-save the model")
    suffix = path.suffix.lower()
    if suffix == ".pt2":
        return _load_pt2(path, specs, seed, trust_pickle, dynamic)
    if suffix == ".onnx":
        return _load_onnx(path, specs, seed, dynamic)
    if suffix in (".pt", ".pth"):
        return _load_pickle_or_script(path, specs, seed, trust_pickle, dynamic)
    if suffix == ".safetensors":
        raise InputError(f"{str(path)!r} holds weights only, not a model",
                         "add --module pkg.mod:factory to build the model they belong to, or pass the "
                         "transformers model directory (config.json + *.safetensors)")
    raise InputError(f"unknown model format {suffix or '(no extension)'!r} for {str(path)!r}",
                     "use a torch.export .pt2 file, an .onnx file, a .pt/.pth module "
                     "(with --trust-pickle) or --module pkg.mod:factory")


# ------------------------------------------------------------------------- loaders
def _load_model_dir(path: Path, specs: list[InputSpec], seed: int, dynamic: bool | list[bool]) -> Graph:
    """A transformers model directory: weights memory-mapped, token ids in, logits out."""
    from .model_dir import DEFAULT_TOKENS, load_causal_lm

    model, weights, vocab = load_causal_lm(path)
    if not specs:
        specs = [InputSpec("input_ids", (1, DEFAULT_TOKENS), torch.int64, vocab)]
    graph = capture(model, example_from_specs(specs, seed), source=str(path), specs=specs, dynamic_batch=dynamic)
    graph.meta["mapped_weights"] = weights
    return graph


def _load_factory_weights(path: Path, module: str, specs: list[InputSpec], seed: int,
                          dynamic: bool | list[bool]) -> Graph:
    """``--module`` builds the model with meta parameters; ``path`` (.safetensors) supplies them."""
    from .model_dir import load_factory_weights

    if not path.is_file():
        raise InputError(f"weights file {str(path)!r} does not exist", "check the path")
    model, example, weights = load_factory_weights(lambda: _from_factory(module), path)
    example = _choose_inputs(example, specs, f"module {module}", seed)
    graph = capture(model, example, source=f"module {module} + {path}", specs=specs, dynamic_batch=dynamic)
    graph.meta["mapped_weights"] = weights
    return graph


def _load_pt2(path: Path, specs: list[InputSpec], seed: int, trust_pickle: bool = False,
              dynamic: bool | list[bool] = False) -> Graph:
    if not zipfile.is_zipfile(path):
        raise InputError(f"{str(path)!r} is not a torch.export archive (truncated or not a .pt2)",
                         "re-create it with torch.export.save(torch.export.export(model, args), path)")
    from .safe_load import load_exported_program

    try:
        ep = load_exported_program(path, trust_pickle=trust_pickle)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"cannot read torch.export archive {str(path)!r}: "
                         f"{_first_line(exc)}",
                         "re-create it with torch.export.save with this torch version") from exc
    saved = ep.example_inputs[0] if ep.example_inputs else None
    example = _choose_inputs(saved, specs, str(path), seed)
    if saved is not None and not specs and not any(_dynamic_flags(dynamic, example)):
        graph = Graph.from_exported_program(ep, example, source=str(path))
        return graph
    # New shapes or a dynamic batch: re-trace the program (its shape guards stripped).
    # Works when the graph has no sizes baked in for the old shapes.
    base = Graph.from_exported_program(ep, tuple(saved) if saved is not None else example,
                                       source=str(path))
    try:
        return capture(base.gm, example, source=str(path), specs=specs, dynamic_batch=dynamic)
    except FixedBatchError as exc:
        name = base.inputs[0].name if base.inputs else "x"
        dims = f"{{{name!r}: {{0: torch.export.Dim('batch')}}}}"
        raise FixedBatchError(f"{exc.message} (a .pt2 exported without dynamic_shapes has its batch baked in)",
                              f"export it with dynamic_shapes={dims}, or drop --dynamic-batch (and B from "
                              "--input)") from exc
    except InputError as exc:
        shapes = ", ".join(s.describe() for s in specs) or "a dynamic batch"
        raise InputError(f"{str(path)!r} was exported for fixed input shapes and does not run at "
                         f"{shapes} ({exc.message.split(': ', 1)[-1]})",
                         "use the shapes it was exported with (omit --input), or export it again "
                         "with dynamic_shapes") from exc


def _load_onnx(path: Path, specs: list[InputSpec], seed: int, dynamic: bool | list[bool] = False) -> Graph:
    from .onnx_import import onnx_to_module

    shapes = [s.shape for s in specs] if specs else None
    module, example = onnx_to_module(path, input_shapes=shapes, seed=seed)
    if specs:
        if len(specs) != len(example):
            raise InputError(f"{str(path)!r} has {len(example)} input(s), got {len(specs)} --input",
                             "pass one --input per model input")
        # The ONNX file knows each input's dtype: a bare shape (float32 by default)
        # keeps it; an explicit non-default dtype wins.
        gen = torch.Generator().manual_seed(seed)
        example = tuple(ex if spec.dtype == torch.float32 else spec.random(gen)
                        for spec, ex in zip(specs, example))
    return capture(module, example, source=str(path), specs=specs, dynamic_batch=dynamic)


def _load_pickle_or_script(path: Path, specs: list[InputSpec], seed: int,
                           trust_pickle: bool, dynamic: bool | list[bool] = False) -> Graph:
    if _is_torchscript(path):
        if not specs:
            raise InputError(f"{str(path)!r} is TorchScript and carries no example inputs",
                             "pass the input shapes, e.g. --input 1x3x224x224")
        example = example_from_specs(specs, seed)
        try:
            from torch._export.converter import TS2EPConverter

            scripted = torch.jit.load(str(path), map_location="cpu")
            ep = TS2EPConverter(scripted, example).convert()
        except Exception as exc:
            raise InputError(f"cannot convert TorchScript file {str(path)!r}: {_first_line(exc)}",
                             "export the model with torch.export.save as .pt2 instead") from exc
        graph = Graph.from_exported_program(ep, example, source=str(path))
        if any(_dynamic_flags(dynamic, example)):  # the converter traces static shapes
            return capture(graph.gm, example, source=str(path), specs=specs, dynamic_batch=dynamic)
        _apply_spec_bounds(graph, specs)
        return graph
    if not trust_pickle:
        raise InputError(f"{str(path)!r} is a pickled module; unpickling runs arbitrary code "
                         "from the file",
                         "pass --trust-pickle if you trust its author, or re-save it safely "
                         "with torch.export.save as .pt2")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise InputError(f"cannot unpickle {str(path)!r}: {_first_line(exc)}",
                         "the file is truncated or was saved by incompatible code; the "
                         "classes it names must be importable") from exc
    if isinstance(obj, dict):
        raise InputError(f"{str(path)!r} holds a state_dict (weights only), not a model",
                         "build the model in code and pass --module pkg.mod:factory, or save "
                         "the module with torch.export.save")
    if not specs:
        raise InputError(f"{str(path)!r} carries no example inputs",
                         "pass the input shapes, e.g. --input 1x3x224x224")
    return capture(obj, example_from_specs(specs, seed), source=str(path), specs=specs, dynamic_batch=dynamic)


def _from_factory(ref: str) -> tuple[torch.nn.Module, Any]:
    mod_name, sep, attr = ref.partition(":")
    if not sep or not mod_name or not attr:
        raise InputError(f"bad --module {ref!r}", "write pkg.module:factory")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # let users name modules in the working directory
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise InputError(f"cannot import {mod_name!r}: {_first_line(exc)}",
                         "check the module is on PYTHONPATH") from exc
    factory: Callable[[], Any] | None = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise InputError(f"{mod_name!r} has no callable {attr!r}",
                         "name a function returning a model or (model, example_inputs)")
    result = factory()
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module):
        return result[0], result[1]
    return result, None


def _choose_inputs(saved: Any, specs: list[InputSpec], source: str,
                   seed: int) -> tuple[torch.Tensor, ...]:
    if specs:
        return example_from_specs(specs, seed)
    if saved is None:
        raise InputError(f"{source} carries no example inputs",
                         "pass the input shapes, e.g. --input 1x3x224x224 or --input 1x128:int64")
    if isinstance(saved, torch.Tensor):
        return (saved,)
    return tuple(saved)


def _apply_spec_bounds(graph: Graph, specs: Sequence[InputSpec] | None) -> None:
    """An explicit ``:HIGH`` in an --input spec overrides the inferred integer range."""
    for i, spec in enumerate(specs or ()):
        if spec.high is not None and i < len(graph.inputs):
            graph.inputs[i] = dataclasses.replace(graph.inputs[i], high=spec.high)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in zf.namelist())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
