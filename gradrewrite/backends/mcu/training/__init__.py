"""The training path of the mcu backend: a training-step graph (forward, loss, backward
and SGD update captured together) as ``model_train_step`` beside ``model_run``.

In order: ``device_form.py`` (an int8 step as the device computes it),
``lowering/`` (the step as kernel calls, built on the inference lowering),
``codegen.py`` (the C project), ``host.py`` (host build and runs), ``compile.py`` (the
backend's compile), ``reference.py`` (the int8 step's integer reference) and
``run.py`` (``gradrewrite run --train`` over a data set, through the harness of
``harness.py``).
"""
