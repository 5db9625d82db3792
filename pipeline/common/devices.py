"""Devices and precision: the one place that decides where a model runs and whether it autocasts."""

from __future__ import annotations

import torch


class DeviceError(ValueError):
    """A device or precision setting this machine cannot honour."""


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA when there is one, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise DeviceError(f"unknown device {device!r} (auto, cpu, cuda or cuda:N): {e}") from None


def use_autocast(device: torch.device, precision: str, option: str = "--precision") -> bool:
    """Whether to run under bf16 autocast: ``auto`` means bf16 on a GPU and fp32 elsewhere.

    ``precision``: auto | fp32 | off | bf16; bf16 off a GPU is refused, naming ``option``.
    """
    if precision == "bf16" and device.type != "cuda":
        raise DeviceError(f"bf16 needs a GPU; use {option} {'off' if option == '--amp' else 'fp32'} on CPU")
    return device.type == "cuda" and precision in ("auto", "bf16")


def autocast(device: torch.device, enabled: bool):
    """The autocast context for ``device`` (bf16), or a no-op when not ``enabled``."""
    return torch.autocast(device.type if device.type == "cuda" else "cpu", dtype=torch.bfloat16, enabled=enabled)
