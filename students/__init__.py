"""Student saliency models (FastSal A and C) and their distillation losses.

Students know nothing of Ray, tars or YAML: a student is an ``nn.Module`` whose ``forward`` takes
ImageNet-normalised RGB (:func:`normalize`) and returns logits ``[B, 1, H, W]``.
"""

from students.fastsal import STUDENT_INFO, STUDENTS, FastSal, FastSalA, FastSalC, fastsal_a, fastsal_c, normalize

__all__ = ["STUDENT_INFO", "STUDENTS", "FastSal", "FastSalA", "FastSalC", "fastsal_a", "fastsal_c", "normalize"]
