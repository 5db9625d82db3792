"""Training students: reading finished label folders (:mod:`~pipeline.train.data`), checkpoints and RNG
state for exact resume (:mod:`~pipeline.train.checkpoints`), the loop (:mod:`~pipeline.train.loop`), its
logs and curves (:mod:`~pipeline.train.logs`), and data-parallel training on Ray Train
(:mod:`~pipeline.train.ray_train`) or under torchrun (:mod:`~pipeline.train.torchrun`).

May import :mod:`pipeline.common`, :mod:`pipeline.label`, :mod:`students`, :mod:`teachers`.
"""
