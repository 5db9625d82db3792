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
    """Whether to run under bf16 autocast: ``auto`` means bf16 on a GPU and fp32 elsewhere; ``bf16`` asks for
    it on any device (PyTorch autocasts on CPU too, so the bf16 path runs and is tested without a GPU).

    ``precision``: auto | fp32 | off | bf16 (``option`` names the flag in messages).
    """
    if precision not in ("auto", "fp32", "off", "bf16"):
        raise DeviceError(f"unknown {option} {precision!r} (auto, fp32 or bf16)")
    return precision == "bf16" or (device.type == "cuda" and precision == "auto")


def autocast(device: torch.device, enabled: bool):
    """The bf16 autocast context for ``device`` (CUDA or CPU), or a no-op when not ``enabled``."""
    return torch.autocast("cuda" if device.type == "cuda" else "cpu", dtype=torch.bfloat16, enabled=enabled)
