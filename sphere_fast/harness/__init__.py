"""The harness around the editing algorithm: what runs, measures and records edits.

Sequential runs with checkpoints (:mod:`.sequential`, :mod:`.running`),
metrics, datasets, models to edit (:mod:`.model_sources`, :mod:`.train_lm`),
run records (:mod:`.report`), the demo and the projection benchmark
(:mod:`.bench_projection`). It uses :mod:`sphere_fast.editing`; the command
line (:mod:`sphere_fast.cli`) is a thin layer over it.
"""
