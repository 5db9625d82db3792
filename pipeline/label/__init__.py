"""Labelling: image sources and the deterministic shard plan (:mod:`~pipeline.label.sources`), the run's settings and the identity every shard records
(:mod:`~pipeline.label.config`), the worker
that turns a shard plan into a finished shard (:mod:`~pipeline.label.worker`), the shard file protocol
(:mod:`~pipeline.label.shards`), the driver that skips finished shards and writes the index
(:mod:`~pipeline.label.driver`), the executors that run the rest on Ray actors or in-process
(:mod:`~pipeline.label.executors`), the contact sheet (:mod:`~pipeline.label.preview`), and the
check of a finished folder (:mod:`~pipeline.label.verify`).

May import :mod:`pipeline.common`, :mod:`teachers`.
"""
