"""The ``gradrewrite`` command.

Every user error ends as one line on stderr and exit code 2 (no traceback unless
``--debug``); anything else is a bug and exits 1 with a pointer to ``--debug``.
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

err_console = Console(stderr=True, highlight=False, log_path=False)
out_console = Console(highlight=False)


class _State:
    debug = False


def _exit_interrupted() -> None:
    """Exit 130 after Ctrl-C. Cleanup (the build directory, worker processes) already ran
    as the interrupt unwound; ``os._exit`` because CPython kills itself with SIGINT at exit
    when the interrupt first surfaced inside C++ that evaluates Python (pybind11), even
    though it was caught here, which turns exit 130 into death by signal."""
    import os

    click.echo("interrupted; nothing was written", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def _friendly(fn):
    """Turn GradrewriteError into one line + exit 2; other errors into exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .errors import GradrewriteError

        try:
            return fn(*args, **kwargs)
        except GradrewriteError as exc:
            if _State.debug:
                raise
            click.echo(f"error: {exc.one_line()}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            _exit_interrupted()
        except (click.exceptions.Exit, click.exceptions.ClickException, SystemExit):
            raise
        except Exception as exc:  # a bug, not bad input
            if _State.debug:
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            click.echo(f"internal error: {type(exc).__name__}: {first} (rerun with --debug for "
                       "the traceback and please report it)", err=True)
            sys.exit(1)

    return wrapper


def _model_options(fn):
    fn = click.option("--module", "module", metavar="PKG.MOD:FACTORY",
                      help="Build the model by calling FACTORY() (returns a module or (module, inputs)).")(fn)
    fn = click.option("--input", "inputs", multiple=True, metavar="SPEC",
                      help="Input shape[:dtype[:high]], e.g. 1x3x96x96 or 1x128:int64; repeat per input.")(fn)
    fn = click.option("--trust-pickle", is_flag=True,
                      help="Allow loading pickled .pt/.pth modules (unpickling runs code from the file).")(fn)
    return fn


def _load(model, module, inputs, trust_pickle, seed=0, dynamic_batch=False):
    from .rewrite.capture import load_model

    with err_console.status("capturing the model …"):
        return load_model(model, module=module, inputs=inputs, trust_pickle=trust_pickle, seed=seed,
                          dynamic_batch=dynamic_batch)


def _wants_dynamic_batch(flag: bool, inputs) -> bool:
    """--dynamic-batch, or an --input spec with a symbolic batch (Bx3x96x96)."""
    from .rewrite.capture import parse_input_spec

    return flag or any(parse_input_spec(text, i).dynamic_batch for i, text in enumerate(inputs))


class _OneLineErrors(click.Group):
    """click's usage errors as one line (not its three-line usage block); Ctrl-C
    anywhere, even while parsing or importing, exits 130."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        import signal

        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            # a script's `gradrewrite … &` starts with SIGINT ignored; `kill -INT` must still stop it cleanly
            signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "gradrewrite"
            click.echo(f"error: {exc.format_message().rstrip('.')}; see `{where} --help`", err=True)
            sys.exit(2)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except (click.Abort, KeyboardInterrupt, EOFError):
            _exit_interrupted()
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.version_option(package_name="gradrewrite")
def main(debug: bool) -> None:
    """Rewrite PyTorch model graphs with named passes and lower them to runnable artifacts."""
    _State.debug = debug
    import warnings

    warnings.filterwarnings("ignore")


def _backend_options_epilog() -> str:
    from .backends.options import describe

    return ("Backend options (Python: gr.compile(..., NAME=VALUE); the flags above set the common ones):\n\n\b\n"
            + describe())


@main.command("compile", epilog=_backend_options_epilog())
@click.argument("model", required=False, type=click.Path(dir_okay=True, path_type=str))
@_model_options
@click.option("--passes", "-p", metavar="PIPELINE", help='Pass pipeline, e.g. "fold-bn,dce".')
@click.option("--recipe", type=click.Path(path_type=str), help="TOML recipe with [[pass]] tables.")
@click.option("--backend", "-b", default="torch", show_default=True,
              help="torch, ort, tvm, openvino, mcu (C for microcontrollers), or auto (build torch, ort, tvm and "
                   "openvino where installed, keep the fastest correct one).")
@click.option("--target", default=None, metavar="TARGET",
              help="tvm: auto (default: cuda when a GPU is present, else the host CPU), llvm or cuda; "
                   "mcu: host (default), cortex-m4 or cortex-m7; openvino: auto (default: GPU when OpenVINO "
                   "sees one), cpu or gpu.")
@click.option("--tune-trials", type=int, default=None,
              help="TVM MetaSchedule trials (default 64 for --backend tvm; 0 = untuned, 30-60x slower on CPU).")
@click.option("--tune-cache", type=click.Path(path_type=str), default=None,
              help="TVM tuning database directory (default $GRADREWRITE_CACHE/tvm or ~/.cache/gradrewrite/tvm).")
@click.option("--opset", type=int, default=None, help="ONNX opset for --backend ort (default 18).")
@click.option("--external-data/--no-external-data", default=None,
              help="Store ONNX weights in model.onnx.data (default: only above 1 GiB).")
@click.option("--precision", default=None, metavar="PRECISION",
              help="openvino: f32 (default, exact), bf16 (lossy, checked within 2^-5 relative) or auto "
                   "(OpenVINO's choice for the device).")
@click.option("--ram-kb", type=int, default=None, help="mcu: SRAM budget in KB the firmware must link within (default 320).")
@click.option("--flash-kb", type=int, default=None, help="mcu: flash budget in KB (default 1024).")
@click.option("-o", "--out", required=True, type=click.Path(path_type=str), help="Artifact directory to write.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--seed", default=0, show_default=True, help="Seed for verification inputs.")
@click.option("--verify-inputs", default=3, show_default=True, help="Random inputs compared against the original.")
@click.option("--dump-graphs", is_flag=True, help="Write the graph after every pass to OUT/graphs/.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.option("--calib", type=click.Path(path_type=str), default=None,
              help="Calibration inputs for passes that need data (quantize): .npz (arrays = model inputs "
                   "in order or by name, first axis = samples) or .pt (loaded with weights_only=True).")
@click.option("--train", is_flag=True, help="Compile one training step (forward, loss, backward, SGD update).")
@click.option("--loss", "loss_name", type=click.Choice(["cross_entropy", "mse", "causal_lm"]), default="cross_entropy",
              show_default=True, help="--train: the loss (causal_lm: next-token cross entropy, with -p stream-bp).")
@click.option("--optimizer", type=click.Choice(["sgd"]), default="sgd", show_default=True, help="--train: optimizer.")
@click.option("--lr", type=float, default=0.01, show_default=True, help="--train: learning rate.")
@click.option("--momentum", type=float, default=0.0, show_default=True, help="--train: SGD momentum.")
@click.option("--logit-headroom", type=float, default=8.0, show_default=True,
              help="--train with static int8: the logits' int8 range is the calibrated one times this "
                   "(1 = as calibrated; calibration sees the untrained head, whose logits fine-tuning outgrows).")
@click.option("--label", "label_spec", metavar="SPEC", default=None,
              help="--train: labels input spec (default: int64 class ids for cross_entropy, the output's "
                   "shape for mse), e.g. 8:int64:10.")
@click.option("--dynamic-batch", is_flag=True,
              help="Make dim 0 of every input a symbolic batch: the artifact runs at any batch size "
                   "(torch, ort, tvm; --input Bx3x96x96 marks one input).")
@_friendly
def compile_cmd(model, module, inputs, trust_pickle, passes, recipe, backend, target, tune_trials, tune_cache,
                opset, external_data, precision, ram_kb, flash_kb, out, force, seed, verify_inputs, dump_graphs, quiet,
                calib=None, train=False, loss_name="cross_entropy", optimizer="sgd", lr=0.01, momentum=0.0,
                label_spec=None, dynamic_batch=False, logit_headroom=8.0):
    """Capture MODEL, run passes, lower it with a backend and write the artifact to OUT.

    MODEL is a torch.export .pt2 file, an .onnx file, a pickled .pt/.pth module (with
    --trust-pickle), or omitted with --module.
    """
    from .backends.base import get_backend
    from .compiler import CompileOptions, check_out_free, compile_graph, pipeline_specs, typed_backend_options
    from .errors import ConfigError
    from .rewrite.pipeline import build_passes
    from .training import Train

    specs = pipeline_specs(passes, recipe)
    requested = build_passes(specs)  # fail on typos before the slow capture
    if backend != "auto":
        get_backend(backend)
    backend_options = typed_backend_options(backend, _backend_options(
        backend, opset=opset, external_data=external_data, target=target, tune_trials=tune_trials,
        tune_cache=tune_cache, precision=precision, ram_kb=ram_kb, flash_kb=flash_kb, quiet=quiet))
    if backend != "auto":  # a device this machine lacks fails before the slow capture
        get_backend(backend).check_request(backend_options, requested)
    if label_spec and not train:
        raise ConfigError("--label applies only with --train", "add --train or drop --label")
    step = Train(loss=loss_name, optimizer=optimizer, lr=lr, momentum=momentum, label=label_spec,
                 logit_headroom=logit_headroom) if train else None
    if step is not None and step.is_stream_bp(specs):
        from .training.stream_bp_step import check_request
        check_request(specs, step, backend)
    check_out_free(out, force)  # before the slow capture
    if _wants_dynamic_batch(dynamic_batch, inputs):
        from .rewrite.dynamic_batch import refuse
        refuse(backend=backend, train=train, stream_bp=any(s.name == "stream-bp" for s in specs))
    graph = _load(model, module, inputs, trust_pickle, seed, dynamic_batch)
    calibration = _calibration(calib, graph)
    opts = CompileOptions(passes=specs, backend=backend, seed=seed, verify_inputs=verify_inputs,
                          dump_graphs=dump_graphs, force=force, backend_options=backend_options,
                          calibration=calibration, train=step)
    art = compile_graph(graph, out, opts, model_file=model, console=None if quiet else err_console)
    click.echo(_compile_summary(out, art.report))


def _compile_summary(out, r: dict) -> str:
    """The one-paragraph result of a compile: what was written and how it was checked."""
    if "stream_bp" in r:
        return _stream_bp_summary(out, r["stream_bp"])
    v = r["verification"]
    lat = r.get("latency_ms") or {}
    mcu = r.get("mcu", {})
    int8 = mcu.get("int8_check") or {}
    against = "the rewritten training step" if r.get("train_step") else "the original model"
    error = (f"max abs error {v['max_abs_error']:.3g} (relative {v['relative_error']:.3g}) against {against} "
             f"over {v['inputs_compared']} inputs")
    if "dynamic_batch" in r:
        dyn = r["dynamic_batch"]
        error += (f" at batches {' and '.join(map(str, dyn['verified']))} (dynamic batch: runs at any batch "
                  f"{dyn['min']}..{dyn['max']})")
    if int8.get("bit_exact") and "parameters" in v:  # an int8 step: checked per parameter in its int8 steps
        worst = max(v["parameters"].items(), key=lambda kv: kv[1]["rms_error_steps"] / (1 + kv[1]["rms_update_steps"]),
                    default=None)
        error = (f"int8 C code bit-exact against the integer reference ({int8['steps']} training steps); against "
                 f"{against} over {v['inputs_compared']} inputs: loss relative error {v['loss_relative_error']:.3g}"
                 + (f", parameters in quantization steps (rms; worst {worst[0]}: "
                    f"{worst[1]['rms_error_steps']:.3g} off for an update of {worst[1]['rms_update_steps']:.3g})"
                    if worst else ""))
    elif int8.get("bit_exact"):  # the float comparison only shows int8 resolution
        what = f"{int8['steps']} training steps" if "steps" in int8 else f"{int8.get('inputs', '')} inputs"
        error = (f"int8 C code bit-exact against the integer reference ({what}); {error}, "
                 "the float model's difference at int8 resolution")
    summary = (f"wrote {out}: backend {r['backend']} ({r['target']}), nodes {r['nodes']['before']} -> "
               f"{r['nodes']['after']}, {error}")
    if not v.get("checked", True):
        summary += " (lossy pipeline: error measured, not checked)"
    if "median" in lat:
        summary += f", {lat['median']:.3g} ms median latency"
    runtime = mcu.get("runtime", {})
    if "instructions" in runtime:
        summary += (f", {runtime['instructions'] / 1e6:.3g} M instructions per inference "
                    f"(QEMU, not cycles), stack {runtime['stack_peak_bytes']} B")
    if "auto" in r:
        summary += f"; auto chose {r['auto']['chosen']}: {r['auto']['reason']}"
    return summary


def _stream_bp_summary(out, s: dict) -> str:
    check, mem = s["gradient_check"], s["gradient_check"]["peak_live_bytes"]
    return (f"wrote {out}: StreamBP training step, {s['layers']} layers, chunk {s['chunk']} (logits "
            f"{s['logits_chunk']}); gradients vs autograd: max relative error "
            f"{check['max_relative_error']:.3g}; peak live tensor memory at the checked length "
            f"{check['batch'][-1]}: autograd {mem['autograd'] / 2**20:.3g} MiB, StreamBP "
            f"{mem['stream_bp'] / 2**20:.3g} MiB (chunking pays once the sequence is several chunks long)")


def _calibration(path, graph):
    """--calib FILE -> calibration samples for the graph's inputs (None without the flag)."""
    if not path:
        return None
    from .rewrite.calibration import load_calibration

    return load_calibration(path, graph.inputs)


def _backend_options(backend: str, *, quiet: bool, **given) -> dict:
    """CLI flags -> backend options; flags a backend does not take are an error."""
    from .errors import ConfigError

    per_backend = {"ort": ("opset", "external_data"), "tvm": ("target", "tune_trials", "tune_cache"),
                   "openvino": ("precision",)}
    if backend == "openvino":  # --target goes to tvm under auto, so openvino's only when named
        per_backend["openvino"] = ("target", "precision")
    if backend == "mcu":  # not an auto candidate, so its flags are routed only when named
        per_backend["mcu"] = ("target", "ram_kb", "flash_kb")
    chosen = {k: v for k, v in given.items() if v is not None}
    if backend == "auto":  # every flag goes to the backend it belongs to, and only there
        return {name: _backend_options(name, quiet=quiet, **{k: v for k, v in chosen.items() if k in flags})
                for name, flags in per_backend.items()}
    stray = sorted(set(chosen) - set(per_backend.get(backend, ())))
    if stray:
        flags = ", ".join("--" + k.replace("_", "-") for k in stray)
        verb = "does" if len(stray) == 1 else "do"
        raise ConfigError(f"{flags} {verb} not apply to --backend {backend}",
                          "drop the flag or pick the backend it belongs to")
    if backend == "tvm":
        from .backends.tvm import RECOMMENDED_TUNE_TRIALS

        chosen.setdefault("tune_trials", RECOMMENDED_TUNE_TRIALS)
        if not quiet:
            chosen["progress"] = _tvm_progress
    return chosen


def _tvm_progress(event: dict) -> None:
    kind = event.get("event")
    if kind == "start":
        err_console.log(f"TVM tuning: {event['trials']} trials over {len(event['tasks'])} of "
                        f"{event['tasks_total']} tasks ({100 * event['flop_share']:.0f}% of FLOPs), "
                        f"cache {event['cache_dir']}")
    elif kind == "batch":
        best = f"{event['best_us']:.1f} us" if event.get("best_us") is not None else "n/a"
        err_console.log(f"  [{event['trials_done']}/{event['trials']}] {event['task']}: best {best}")
    elif kind == "reuse":
        err_console.log(f"TVM tuning: reusing {event['trials_recorded']} recorded trials from {event['cache_dir']}")
    elif kind == "done":
        err_console.log(f"TVM tuning: {event['trials']} new trials in {event['seconds']:.0f}s")


@main.command("run")
@click.argument("artifact", type=click.Path(path_type=str))
@click.option("--input", "inputs", multiple=True, type=click.Path(path_type=str),
              help="A .npy file per model input, or one .npz holding them in order.")
@click.option("--random", "use_random", is_flag=True, help="Run on seeded random inputs of the compiled shapes.")
@click.option("--seed", default=0, show_default=True)
@click.option("-o", "--output", default="outputs.npz", show_default=True, type=click.Path(path_type=str),
              help="Where to write the outputs (.npz, keys output_0, output_1, …).")
@click.option("--compare", is_flag=True,
              help="mcu artifacts: check the outputs against the reference (int8: bit-exact against the "
                   "integer reference; fp32: within rounding of the torch backend).")
@click.option("--labels", "labels_path", type=click.Path(path_type=str), default=None,
              help="stream-bp training artifacts: a .npy of label ids shaped like the input (default: the input).")
@click.option("--train", "train_path", type=click.Path(path_type=str), default=None,
              help="mcu training-step artifacts: train on this .npz (x: inputs, y: int labels), batches in order, "
                   "cycling; on the host build or the firmware under QEMU, per the compiled target.")
@click.option("--steps", type=int, default=None, help="--train: training steps (default: one pass over the data).")
@click.option("--trust-pickle", is_flag=True,
              help="Allow the artifact's .pt2 to unpickle arbitrary objects (runs code from the file).")
@click.option("--batch", type=int, default=None,
              help="--random on a dynamic-batch artifact: the batch size (default: the compiled example's).")
@click.option("--lr", type=float, default=None, help="--train: learning rate (default: the compiled one).")
@click.option("--save-weights", type=click.Path(path_type=str), default=None,
              help="--train: write every trained parameter (whole, float32) to a .safetensors or .pt file.")
@_friendly
def run_cmd(artifact, inputs, use_random, seed, output, compare, labels_path=None, train_path=None, steps=None,
            lr=None, save_weights=None, trust_pickle=False, batch=None):
    """Run a compiled ARTIFACT directory and write its outputs (or, with --train, train it)."""
    import numpy as np

    from .compiler import Artifact
    from .errors import InputError

    art = Artifact(artifact, trust_pickle=trust_pickle)
    if train_path is not None or steps is not None or lr is not None or save_weights is not None:
        if inputs or use_random or compare or labels_path:
            raise InputError("--train runs training steps; it takes no --input, --random, --compare or --labels",
                             "drop them, or drop --train to run inference")
        return _run_train(art, train_path, steps, lr, save_weights)
    if compare and art.backend != "mcu":
        from .errors import ConfigError
        raise ConfigError(f"--compare checks mcu artifacts; {artifact!r} is a {art.backend} artifact",
                          "drop --compare (compile already verified it against the original model)")
    if use_random == bool(inputs):
        raise InputError("give the inputs with --input FILE.npy (one per input) or pass --random",
                         "see `gradrewrite run --help`")
    if batch is not None and not (use_random and "dynamic_batch" in art.report):
        raise InputError("--batch sets the batch of --random inputs for a dynamic-batch artifact",
                         "drop --batch" if "dynamic_batch" not in art.report else "add --random, or drop --batch "
                         "(an --input array's first dimension is its batch)")
    if use_random:
        import torch
        from .rewrite.graph import InputSpec
        gen = torch.Generator().manual_seed(seed)
        example = art.report.get("dynamic_batch", {}).get("example")
        arrays = [InputSpec(s["name"], tuple(example if d == "B" else d for d in s["shape"]),
                            getattr(torch, s["dtype"]), s.get("high"), s["shape"][:1] == ["B"])
                  .random(gen, batch).numpy() for s in art.report["inputs"]]
    else:
        arrays = []
        for path in inputs:
            arrays.extend(_read_arrays(Path(path)))
    out = Path(output)
    if out.suffix != ".npz":
        raise InputError(f"output file {output!r} must end in .npz", "e.g. -o outputs.npz")
    from .outputs import atomic_file, check_out_file
    check_out_file(out)
    outputs = art(*arrays, **({"labels": _read_arrays(Path(labels_path))[0]} if labels_path else {}))
    checked = None
    if compare:  # before writing: a failed check leaves no outputs behind
        from .backends.mcu.inference.reference import compare as mcu_compare
        checked = mcu_compare(art.path / "mcu", arrays, outputs)
    with atomic_file(out) as tmp:
        np.savez(tmp, **{f"output_{i}": o for i, o in enumerate(outputs)})
    for i, o in enumerate(outputs):
        click.echo(f"output_{i}: {'x'.join(map(str, o.shape)) if o.ndim else 'scalar'} {o.dtype}")
    if checked is not None:
        click.echo(f"compare: ok ({checked['mode']}; max abs error {checked['max_abs_error']:.3g}, "
                   f"relative {checked['relative_error']:.3g})")
    click.echo(f"wrote {output}")


def _run_train(art, train_path, steps, lr, save_weights) -> None:
    """`run --train`: SGD steps of an mcu training-step artifact over a data set."""
    from .errors import ConfigError

    if train_path is None:
        raise ConfigError("--steps, --lr and --save-weights go with --train DATA.npz", "add --train DATA.npz")

    def start(plan: dict) -> None:
        where = "host build" if plan["target"] == "host" else plan["target"] + " firmware under QEMU"
        click.echo(f"training {plan['parameters']} parameters for {plan['steps']} steps on {plan['batches']} "
                   f"batches of {plan['batch']} ({where}), lr {plan['lr']:g}")
    run = art.train(train_path, steps=steps, lr=lr, save_weights=save_weights, on_start=start,
                    progress=lambda i, n, loss: click.echo(f"step {i}/{n} loss {loss:.6g}"))
    losses = run.losses
    k = max(1, min(10, len(losses) // 4))   # means over a few steps: one batch's loss is noisy
    click.echo(f"done: {len(losses)} steps, mean loss of the first {k} {float(losses[:k].mean()):.6g}, of the "
               f"last {k} {float(losses[-k:].mean()):.6g}; {run.trained_bytes} bytes trained")
    if save_weights:
        click.echo(f"wrote {save_weights} ({len(run.saved)} parameters)")


def _read_arrays(path: Path):
    import numpy as np

    from .errors import InputError

    if not path.is_file():
        raise InputError(f"input file {str(path)!r} does not exist", "check the path")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise InputError(f"cannot read {str(path)!r} as .npy/.npz: {str(exc).splitlines()[0]}",
                         "save inputs with numpy.save / numpy.savez (no pickled objects)") from exc
    if isinstance(data, np.ndarray):
        return [data]
    return [data[k] for k in data.files]


@main.command("inspect")
@click.argument("model", required=False, type=click.Path(path_type=str))
@_model_options
@click.option("--passes", "-p", metavar="PIPELINE", help="Show the graph after this pipeline.")
@click.option("--recipe", type=click.Path(path_type=str))
@click.option("--format", "-f", "fmt", default="table", show_default=True,
              type=click.Choice(["table", "dot", "json", "html", "svg"]))
@click.option("--diff", "show_diff", is_flag=True, help="Compare the graph before and after the passes.")
@click.option("--weights", is_flag=True, help="List weights as their own rows/nodes (table, dot).")
@click.option("-o", "--output", type=click.Path(path_type=str), help="Write to a file instead of stdout.")
@click.option("--calib", type=click.Path(path_type=str), default=None,
              help="Calibration inputs for the passes (.npz or .pt, as for compile).")
@click.option("--train", is_flag=True, help="Inspect the training step (cross-entropy, SGD) and its memory plan.")
@click.option("--lr", type=float, default=0.01, show_default=True, help="--train: learning rate.")
@_friendly
def inspect_cmd(model, module, inputs, trust_pickle, passes, recipe, fmt, show_diff, weights, output,
                calib=None, train=False, lr=0.01):
    """Show MODEL's graph (optionally after passes, with a diff) as a table, dot, JSON or HTML."""
    from .compiler import pipeline_specs, run_pipeline
    from .errors import ConfigError
    from .rewrite import inspect as gi
    from .rewrite.pipeline import build_passes

    specs = pipeline_specs(passes, recipe)
    build_passes(specs)
    if output:  # before the slow capture
        from .outputs import check_out_file
        check_out_file(output)
    if show_diff and not specs:
        raise ConfigError("--diff needs --passes or --recipe", "name the pipeline to compare against")
    before = _load(model, module, inputs, trust_pickle)
    calibration = _calibration(calib, before)  # samples of the model's inputs (not the labels)
    if train:  # as compile --train: inference passes (fold-bn, quantize) before the capture
        from .training import Train, prepare
        before, specs = prepare(before, specs, Train(lr=lr), backend="torch", calibration=calibration)
    after = None
    error_tables: list[str] = []
    if specs:
        from .passes.quantize.error_report import error_tables as quant_error_tables
        from .rewrite.registry import PassContext

        after = before.clone()
        ctx = PassContext(calibration=calibration)
        error_tables = quant_error_tables(run_pipeline(after, specs, verify=True, ctx=ctx).reports())
    title = Path(model).name if model else (module or "model")
    if train and fmt == "table":  # the static memory plan of the (rewritten) training step
        from .rewrite.memory_plan import memory_report

        mem = memory_report(after or before)
        click.echo("memory plan: " + ", ".join(
            f"{k.removesuffix('_bytes')} {v / 1024:.1f} KB" for k, v in mem.items() if k.endswith("_bytes")),
            err=True)
    if fmt == "svg":
        text = gi.render_svg(gi.render("dot", before, after, show_diff=show_diff, title=title,
                                       weights=weights))
        if text is None:
            raise ConfigError("--format svg needs graphviz's `dot`", "apt-get install graphviz, or use --format html")
    else:
        text = gi.render(fmt, before, after, show_diff=show_diff, title=title, weights=weights)
    if fmt == "table" and error_tables:  # quantize's per-layer error report follows the graph
        text = "\n\n".join([text.rstrip("\n"), *error_tables])
    if output:
        from .outputs import atomic_file
        with atomic_file(output) as tmp:
            tmp.write_text(text)
        click.echo(f"wrote {output}", err=True)
    elif fmt == "table" and sys.stdout.isatty():  # colour the +/-/~ rows on a terminal
        desc_after = gi.describe(after or before, title=title)
        changes = gi.diff(gi.describe(before, title=title), desc_after) if show_diff else None
        gi.print_table(desc_after, out_console, changes, weights=weights)
        for table in error_tables:
            click.echo("\n" + table)
    else:
        click.echo(text)


@main.command("check")
@click.argument("model", required=False, type=click.Path(dir_okay=True, path_type=str))
@_model_options
@click.option("--passes", "-p", metavar="PIPELINE", help="Check the graph after this pipeline.")
@click.option("--recipe", type=click.Path(path_type=str))
@click.option("--target", type=click.Choice(["cortex-m4", "cortex-m7", "host"]), default="cortex-m4",
              show_default=True, help="mcu target to check against.")
@click.option("--train", is_flag=True, help="Check the training step (as compile --train: the inference passes, "
              "the capture, then the training passes) instead of the inference graph.")
@click.option("--calib", type=click.Path(path_type=str), default=None,
              help="Calibration inputs for the passes (.npz or .pt, as for compile).")
@_friendly
def check_cmd(model, module, inputs, trust_pickle, passes, recipe, target, train=False, calib=None):
    """List every op of MODEL the mcu backend cannot generate (exit 1 if any), before building;
    for an int8 graph also the ops that stay fp32 between the int8 layers, and why. With
    --train: every op of the training step it cannot lower (an int8 step: also every op
    without a bit-exact integer reference)."""
    from .backends.mcu.check import check_graph, fp32_ops, patch_plan
    from .compiler import pipeline_specs, run_pipeline
    from .rewrite.pipeline import build_passes

    specs = pipeline_specs(passes, recipe)
    build_passes(specs)
    if _wants_dynamic_batch(False, inputs):
        from .errors import ConfigError
        raise ConfigError("the mcu backend generates code for fixed shapes; --input B… asks for a dynamic batch",
                          "give the batch size, e.g. --input 1x3x96x96")
    graph = _load(model, module, inputs, trust_pickle)
    if train:
        from .backends.mcu.check import check_train_step
        from .rewrite.registry import PassContext
        from .training import Train, prepare

        calibration = _calibration(calib, graph)
        graph, rest = prepare(graph, specs, Train(), backend="mcu", calibration=calibration)
        run_pipeline(graph, rest, verify=False, ctx=PassContext(calibration=calibration))
        problems = check_train_step(graph, target)
        for p in problems:
            click.echo(p.line())
        if problems:
            click.echo(f"{len(problems)} op(s) of the training step cannot be generated for {target}", err=True)
            sys.exit(1)
        click.echo(f"all {graph.node_count()} ops of the training step can be generated for {target}")
        return
    if specs:
        run_pipeline(graph, specs, verify=True)
    problems = check_graph(graph, target)
    for p in problems:
        click.echo(p.line())
    for p in fp32_ops(graph):   # int8 graphs: what runs fp32 between the int8 layers, and why
        click.echo(f"stays fp32: {p.line()}")
    plan = None if problems else patch_plan(graph)   # the first stage patch by patch: split, grid, recompute
    if plan:
        click.echo(plan)
    if problems:
        click.echo(f"{len(problems)} op(s) cannot be generated for {target}; rewrite them with a pass "
                   "or export the model without them", err=True)
        sys.exit(1)
    click.echo(f"all {graph.node_count()} ops can be generated for {target}")


@main.command("passes")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable list.")
@_friendly
def passes_cmd(as_json):
    """List every registered pass with its options."""
    from .rewrite.registry import pass_options, pass_summary, registered_passes

    passes = registered_passes()
    if as_json:
        click.echo(json.dumps({name: {"doc": pass_summary(cls),
                                      "requires": list(cls.requires), "ensures": list(cls.ensures),
                                      "options": [{"name": n, "type": t, "default": d, "help": h}
                                                  for n, t, d, h in pass_options(cls)]}
                               for name, cls in passes.items()}, indent=2, default=str))
        return
    table = Table(title="registered passes", show_lines=True)
    table.add_column("pass", style="bold")
    table.add_column("what it does")
    table.add_column("options (default)")
    table.add_column("requires / ensures")
    for name, cls in passes.items():
        doc = pass_summary(cls)
        opts = "\n".join(f"{n}: {t} = {d!r}" + (f"  ({h})" if h else "") for n, t, d, h in pass_options(cls))
        props = ", ".join(cls.requires) + (" / " if cls.requires or cls.ensures else "") + ", ".join(cls.ensures)
        table.add_row(name, doc, opts or "-", props or "-")
    Console(width=max(100, out_console.width)).print(table)


if __name__ == "__main__":  # pragma: no cover
    main()
