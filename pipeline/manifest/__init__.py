"""Manifests: the YAML format (:mod:`~pipeline.manifest.format`), what each command means as a step
(:mod:`~pipeline.manifest.steps`), deciding what to run (:mod:`~pipeline.manifest.plan`, a pure function)
and running it with its state file and lock (:mod:`~pipeline.manifest.runner`).

May import the stages below it, :mod:`pipeline.common`, :mod:`pipeline.label`, :mod:`pipeline.train` and
:mod:`pipeline.score` (to check outputs and draw the report). It never imports the CLI: the click group whose
commands are the steps is handed in by the caller.
"""
