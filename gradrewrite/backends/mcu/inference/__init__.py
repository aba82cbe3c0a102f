"""The inference path of the mcu backend: an inference graph as a C project whose
``model_run`` computes the model's outputs.

In order: ``lowering/`` (graph -> ``Program``), ``codegen.py`` (arena plan, C files),
``compile.py`` (the backend's compile: build, int8 check, firmware, measurement),
``runner.py`` (run the built project). ``reference.py`` checks an artifact's outputs
for ``gradrewrite run --compare``; ``nm.py`` packs N:M sparse weights.
"""
