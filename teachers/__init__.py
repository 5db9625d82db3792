"""Teacher networks (DeepGaze II / IIE, SalGAN, a classical weight-free teacher) and their weights."""

from teachers.base import LABEL_EXTENSION, OutputKind, Teacher
from teachers.registry import available, build_teacher, register

__all__ = ["LABEL_EXTENSION", "OutputKind", "Teacher", "available", "build_teacher", "register"]
