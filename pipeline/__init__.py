"""The saliency distillation pipeline: sources, sharded labelling on Ray, and its CLI."""

__version__ = "0.1.0"
