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
            click.echo("interrupted; nothing was written", err=True)
            sys.exit(130)
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


def _load(model, module, inputs, trust_pickle, seed=0):
    from .rewrite.capture import load_model

    with err_console.status("capturing the model …"):
        return load_model(model, module=module, inputs=inputs, trust_pickle=trust_pickle, seed=seed)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.version_option(package_name="gradrewrite")
def main(debug: bool) -> None:
    """Rewrite PyTorch model graphs with named passes and lower them to runnable artifacts."""
    _State.debug = debug
    import warnings

    warnings.filterwarnings("ignore")


@main.command("compile")
@click.argument("model", required=False, type=click.Path(dir_okay=True, path_type=str))
@_model_options
@click.option("--passes", "-p", metavar="PIPELINE", help='Pass pipeline, e.g. "fold-bn,dce".')
@click.option("--recipe", type=click.Path(path_type=str), help="TOML recipe with [[pass]] tables.")
@click.option("--backend", "-b", default="torch", show_default=True, help="torch, ort, tvm, or auto (build all, keep the fastest correct one).")
@click.option("--target", type=click.Choice(["auto", "llvm", "cuda"]), default=None,
              help="TVM target (default auto: cuda when a GPU is present, else the host CPU).")
@click.option("--tune-trials", type=int, default=None,
              help="TVM MetaSchedule trials (default 64 for --backend tvm; 0 = untuned, 30-60x slower on CPU).")
@click.option("--tune-cache", type=click.Path(path_type=str), default=None,
              help="TVM tuning database directory (default $GRADREWRITE_CACHE/tvm or ~/.cache/gradrewrite/tvm).")
@click.option("--opset", type=int, default=None, help="ONNX opset for --backend ort (default 18).")
@click.option("--external-data/--no-external-data", default=None,
              help="Store ONNX weights in model.onnx.data (default: only above 1 GiB).")
@click.option("-o", "--out", required=True, type=click.Path(path_type=str), help="Artifact directory to write.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--seed", default=0, show_default=True, help="Seed for verification inputs.")
@click.option("--verify-inputs", default=3, show_default=True, help="Random inputs compared against the original.")
@click.option("--dump-graphs", is_flag=True, help="Write the graph after every pass to OUT/graphs/.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@_friendly
def compile_cmd(model, module, inputs, trust_pickle, passes, recipe, backend, target, tune_trials, tune_cache,
                opset, external_data, out, force, seed, verify_inputs, dump_graphs, quiet):
    """Capture MODEL, run passes, lower it with a backend and write the artifact to OUT.

    MODEL is a torch.export .pt2 file, an .onnx file, a pickled .pt/.pth module (with
    --trust-pickle), or omitted with --module.
    """
    from .compiler import CompileOptions, check_out_free, compile_graph, pipeline_specs
    from .rewrite.pipeline import build_passes
    from .backends.base import get_backend

    build_passes(pipeline_specs(passes, recipe))  # fail on typos before the slow capture
    if backend != "auto":
        get_backend(backend)
    check_out_free(out, force)  # before the slow capture
    graph = _load(model, module, inputs, trust_pickle, seed)
    backend_options = _backend_options(backend, opset=opset, external_data=external_data, target=target,
                                       tune_trials=tune_trials, tune_cache=tune_cache, quiet=quiet)
    opts = CompileOptions(passes=passes, recipe=recipe, backend=backend, seed=seed,
                          verify_inputs=verify_inputs, dump_graphs=dump_graphs, force=force,
                          backend_options=backend_options)
    art = compile_graph(graph, out, opts, model_file=model, console=None if quiet else err_console)
    r = art.report
    v = r["verification"]
    lat = r.get("latency_ms") or {}
    summary = (f"wrote {out}: backend {r['backend']} ({r['target']}), nodes {r['nodes']['before']} -> "
               f"{r['nodes']['after']}, max abs error {v['max_abs_error']:.3g} (relative {v['relative_error']:.3g}) "
               f"over {v['inputs_compared']} inputs")
    if not v.get("checked", True):
        summary += " (lossy pipeline: error measured, not checked)"
    if lat:
        summary += f", {lat['median']:.3g} ms median latency"
    if "auto" in r:
        summary += f"; auto chose {r['auto']['chosen']}: {r['auto']['reason']}"
    click.echo(summary)


def _backend_options(backend: str, *, quiet: bool, **given) -> dict:
    """CLI flags -> backend options; flags a backend does not take are an error."""
    from .errors import ConfigError

    per_backend = {"ort": ("opset", "external_data"), "tvm": ("target", "tune_trials", "tune_cache")}
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
@_friendly
def run_cmd(artifact, inputs, use_random, seed, output):
    """Run a compiled ARTIFACT directory and write its outputs."""
    import numpy as np

    from .compiler import Artifact
    from .errors import InputError

    art = Artifact(artifact)
    if use_random == bool(inputs):
        raise InputError("give the inputs with --input FILE.npy (one per input) or pass --random",
                         "see `gradrewrite run --help`")
    if use_random:
        import torch
        from .rewrite.graph import InputSpec
        gen = torch.Generator().manual_seed(seed)
        arrays = [InputSpec(s["name"], tuple(s["shape"]), getattr(torch, s["dtype"]), s.get("high"))
                  .random(gen).numpy() for s in art.report["inputs"]]
    else:
        arrays = []
        for path in inputs:
            arrays.extend(_read_arrays(Path(path)))
    outputs = art(*arrays)
    out = Path(output)
    if out.suffix != ".npz":
        raise InputError(f"output file {output!r} must end in .npz", "e.g. -o outputs.npz")
    tmp = out.with_name(f".{out.name}.tmp.npz")
    np.savez(tmp, **{f"output_{i}": o for i, o in enumerate(outputs)})
    tmp.replace(out)
    for i, o in enumerate(outputs):
        click.echo(f"output_{i}: {'x'.join(map(str, o.shape))} {o.dtype}")
    click.echo(f"wrote {output}")


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
@_friendly
def inspect_cmd(model, module, inputs, trust_pickle, passes, recipe, fmt, show_diff, weights, output):
    """Show MODEL's graph (optionally after passes, with a diff) as a table, dot, JSON or HTML."""
    from .compiler import pipeline_specs, run_pipeline
    from .errors import ConfigError
    from .rewrite import inspect as gi
    from .rewrite.pipeline import build_passes

    specs = pipeline_specs(passes, recipe)
    build_passes(specs)
    if show_diff and not specs:
        raise ConfigError("--diff needs --passes or --recipe", "name the pipeline to compare against")
    before = _load(model, module, inputs, trust_pickle)
    after = None
    if specs:
        after = before.clone()
        run_pipeline(after, specs, verify=True)
    title = Path(model).name if model else (module or "model")
    if fmt == "svg":
        text = gi.render_svg(gi.render("dot", before, after, show_diff=show_diff, title=title,
                                       weights=weights))
        if text is None:
            raise ConfigError("--format svg needs graphviz's `dot`", "apt-get install graphviz, or use --format html")
    else:
        text = gi.render(fmt, before, after, show_diff=show_diff, title=title, weights=weights)
    if output:
        out = Path(output)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(text)
        tmp.replace(out)
        click.echo(f"wrote {output}", err=True)
    elif fmt == "table" and sys.stdout.isatty():  # colour the +/-/~ rows on a terminal
        desc_after = gi.describe(after or before, title=title)
        changes = gi.diff(gi.describe(before, title=title), desc_after) if show_diff else None
        gi.print_table(desc_after, out_console, changes, weights=weights)
    else:
        click.echo(text)


@main.command("passes")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable list.")
@_friendly
def passes_cmd(as_json):
    """List every registered pass with its options."""
    from .rewrite.registry import pass_options, registered_passes

    passes = registered_passes()
    if as_json:
        click.echo(json.dumps({name: {"doc": (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "",
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
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        opts = "\n".join(f"{n}: {t} = {d!r}" + (f"  ({h})" if h else "") for n, t, d, h in pass_options(cls))
        props = ", ".join(cls.requires) + (" / " if cls.requires or cls.ensures else "") + ", ".join(cls.ensures)
        table.add_row(name, doc, opts or "-", props or "-")
    Console(width=max(100, out_console.width)).print(table)


if __name__ == "__main__":  # pragma: no cover
    main()
