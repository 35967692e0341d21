"""The editing algorithm: MEMIT, AlphaEdit, RECT, PRUNE and FT on Hugging Face causal LMs, with SPHERE.

:class:`~.editor.Editor` edits one batch at a time with a method from
:mod:`.methods` (an :class:`~.strategy.EditMethod`, one module per method); the
rest of this package is what they compute (keys, target values, key
statistics) and their settings (:mod:`.hparams`). Running many batches, evaluating, reading
datasets and models, and the demo live in :mod:`sphere_fast.harness`; the
command line in :mod:`sphere_fast.cli`. See docs/editing.md.
"""
