"""Scoring models: the benchmark metrics (:mod:`~pipeline.score.metrics`), fixation datasets
(:mod:`~pipeline.score.fixations`), any model as a predictor of log densities
(:mod:`~pipeline.score.predictors`), and ``eval``, ``predict`` and ``profile``.

May import :mod:`pipeline.common`, :mod:`pipeline.label`, :mod:`pipeline.train` (checkpoints, shard
reading), :mod:`students`, :mod:`teachers`.
"""
