"""The saliency distillation pipeline, one subpackage per stage of the data flow:

* :mod:`pipeline.common` -- atomic writes, image I/O, devices and precision, tables, decode-ahead;
* :mod:`pipeline.label` -- sources, the shard plan, the labelling worker and its driver, shard files;
* :mod:`pipeline.train` -- reading shards, the training loop, checkpoints, logs, Ray Train;
* :mod:`pipeline.score` -- metrics, fixation datasets, predictors, eval, predict, profile;
* :mod:`pipeline.manifest` -- the manifest format, the plan, the runner and its state;
* :mod:`pipeline.cli` -- the click commands.

Imports go down that list only (a stage imports the stages above it, never one below); all may use
:mod:`students` and :mod:`teachers`; nothing imports :mod:`pipeline.cli`.
"""

__version__ = "0.1.0"
