"""Student saliency models, their contract and registry, and the distillation losses.

* :mod:`students.base` -- the contract every student keeps (input normalisation, logits at the input
  size, stride, optional hint features, extra loss terms and extra maps) and the map conventions;
* :mod:`students.registry` -- students by name: ``available()``, ``student_info(name)``, ``build_student``;
* :mod:`students.fastsal` -- FastSal (A) and (C); :mod:`students.sact` -- SACT / ACT ResNets;
* :mod:`students.losses` -- the distillation losses (FastSal's Eqs. 1-3);
* :mod:`students.weights` -- torchvision backbones and whole-student checkpoints.

May import ``torch``, ``torchvision`` and ``teachers`` (weights loading, hint targets); never ``pipeline``.
"""

from students.base import Student, TrainOutput, normalize, student_kind, to_log_density
from students.fastsal import FastSal, FastSalA, FastSalC, fastsal_a, fastsal_c
from students.registry import StudentOption, available, build_student, check_options, register, student_info

__all__ = ["FastSal", "FastSalA", "FastSalC", "Student", "StudentOption", "TrainOutput", "available", "build_student",
           "check_options", "fastsal_a", "fastsal_c", "normalize", "register", "student_info", "student_kind",
           "to_log_density"]
