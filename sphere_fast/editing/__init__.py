"""The editing algorithm: MEMIT and AlphaEdit on Hugging Face causal LMs, with SPHERE.

:class:`~.editor.Editor` edits one batch at a time; the rest of this package is
what it computes (keys, target values, key statistics, the closed-form updates)
and its settings (:mod:`.hparams`). Running many batches, evaluating, reading
datasets and models, and the demo live in :mod:`sphere_fast.harness`; the
command line in :mod:`sphere_fast.cli`. See docs/editing.md.
"""
