"""Models the way large ones ship: a transformers directory (``config.json`` +
``*.safetensors``), or ``.safetensors`` weights plus a ``--module`` factory.

The module is built with its parameters on the ``meta`` device (no memory, no random
initialisation); its buffers (rotary tables ...) are computed for real, since a
checkpoint rarely stores them. The parameters are then bound to views of the
memory-mapped files (``mapped_safetensors``), so the weights are in memory once, as
file pages the compiler can drop and re-read, never as a private copy.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..errors import InputError
from .mapped_safetensors import MappedWeights, read_weights

DEFAULT_TOKENS = 16   # sequence length traced when no --input is given
_INDEX = "model.safetensors.index.json"


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built in this block get ``meta`` parameters: shapes without memory, and
    initialisers that run on nothing. Buffers stay real."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def bind_weights(model: torch.nn.Module, weights: MappedWeights, source: str,
                 tie: Callable[[], Any] | None = None) -> torch.nn.Module:
    """Bind ``model``'s meta parameters to the mapped tensors, by state-dict name (no copy);
    ``tie`` re-ties shared weights (an LM head stored once as the embedding)."""
    tensors = weights.tensors()
    state = model.state_dict(keep_vars=True)
    wrong = [f"{k} (file {list(t.shape)}, model {list(state[k].shape)})" for k, t in tensors.items()
             if k in state and tuple(t.shape) != tuple(state[k].shape)]
    if wrong:
        raise InputError(f"{source}: {len(wrong)} weight(s) do not fit the model's shapes: {', '.join(wrong[:3])}",
                         "the weights belong to another configuration of the model")
    unexpected = [k for k in tensors if k not in state]
    if unexpected:
        raise InputError(f"{source}: {len(unexpected)} stored tensor(s) the model has no place for: "
                         f"{', '.join(unexpected[:3])}", "the weights belong to another model")
    model.load_state_dict(tensors, strict=False, assign=True)
    if tie is not None:
        tie()
    missing = [n for n, t in list(model.named_parameters(remove_duplicate=False)) +
               list(model.named_buffers(remove_duplicate=False)) if t.device.type == "meta"]
    if missing:
        raise InputError(f"{source}: {len(missing)} weight(s) of the model are not in the files: "
                         f"{', '.join(missing[:3])}", "the weights are incomplete (a shard missing?)")
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def weight_files(directory: Path) -> list[Path]:
    """The directory's safetensors shards (those its index names, when it has one)."""
    index = directory / _INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"{str(index)!r} is not a safetensors index ({exc})",
                             "download or save the model again") from exc
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise InputError(f"{str(directory)!r} lacks shard {missing[0]!r} named by {_INDEX}",
                             "download the missing shards")
        return [directory / n for n in names]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise InputError(f"{str(directory)!r} has no *.safetensors weights",
                         "save the model with save_pretrained(..., safe_serialization=True)")
    return files


def load_causal_lm(directory: Path) -> tuple[torch.nn.Module, MappedWeights, int]:
    """A transformers causal LM from ``directory``, weights memory-mapped; also its vocabulary
    size (the bound of random token ids)."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise InputError(f"{str(directory)!r} has no config.json",
                         "pass a transformers model directory (config.json + *.safetensors), or a model file")
    try:
        json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{str(config_path)!r} is not valid JSON ({exc})", "download or save the model again") from exc
    files = weight_files(directory)
    try:
        import transformers
    except ImportError as exc:
        raise InputError("loading a model directory needs transformers", "pip install transformers") from exc
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"transformers cannot read {str(config_path)!r}: {first}",
                         "check model_type names an architecture this transformers version knows") from exc
    config.use_cache = False
    weights = read_weights(files)
    try:
        with parameters_on_meta():
            model = transformers.AutoModelForCausalLM.from_config(config)
    except ValueError as exc:
        raise InputError(f"{str(directory)!r} is a {type(config).__name__}, not a causal language model",
                         "model directories load with AutoModelForCausalLM; build others with --module") from exc
    model = bind_weights(model.eval(), weights, str(directory), tie=model.tie_weights)
    vocab = getattr(config, "vocab_size", None) or getattr(config.get_text_config(), "vocab_size")
    return model, weights, int(vocab)


def load_factory_weights(factory: Callable[[], Any], path: Path) -> tuple[torch.nn.Module, Any, MappedWeights]:
    """``--module`` builds the module (on meta), ``path`` (.safetensors) supplies its weights."""
    weights = read_weights([path])
    with parameters_on_meta():
        result = factory()
    model, example = result if isinstance(result, tuple) and len(result) == 2 else (result, None)
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"the --module factory returned a {type(model).__name__}, not a torch.nn.Module",
                         "return the module (or (module, example_inputs))")
    tie = getattr(model, "tie_weights", None)
    return bind_weights(model, weights, str(path), tie=tie if callable(tie) else None), example, weights
