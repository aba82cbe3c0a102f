"""A symbolic batch in TVM: one library, two entry points.

The importer turns torch.export's symbolic batch into a TIR variable, so ``main`` takes
any batch. MetaSchedule only tunes static shapes (a dynamic task fails inside its
sampler), so a tuned build also gets ``main`` specialised to the example batch under
``STATIC_ENTRY``: tuned at that batch, its kernels match the tuning records; ``main``'s
dynamic kernels keep TVM's default schedules. The runner calls ``STATIC_ENTRY`` when
every input has its example shape, ``main`` otherwise.
"""
from __future__ import annotations

STATIC_ENTRY = "main_example_batch"


def _batch_vars(mod) -> list:
    """The symbolic dim-0 variables of ``main``'s tensor parameters (one, shared)."""
    from tvm import tirx

    found = []
    for param in mod["main"].params:
        shape = getattr(getattr(param, "ty", None), "shape", None)
        dims = list(getattr(shape, "values", None) or [])
        if dims and isinstance(dims[0], tirx.Var) and not any(dims[0].same_as(v) for v in found):
            found.append(dims[0])
    return found


def specialise(mod, batch: int):
    """``mod`` with ``main``'s batch fixed at ``batch``: what MetaSchedule tunes."""
    out = mod.clone()
    out.update_func(out.get_global_var("main"),
                    mod["main"].bind_symbolic_vars({v: batch for v in _batch_vars(mod)}))
    return out


def with_static_entry(mod, batch: int):
    """``mod`` plus ``main`` specialised to ``batch`` as ``STATIC_ENTRY``."""
    out = mod.clone()
    out[STATIC_ENTRY] = specialise(mod, batch)["main"].with_attr("global_symbol", STATIC_ENTRY)
    return out
