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
    except RuntimeError:  # torch's message lists every device type it knows
        raise DeviceError(f"unknown device {device!r}: give auto, cpu, cuda or cuda:N") from None


def available(device: torch.device, option: str = "--device") -> torch.device:
    """``device`` when this process can compute on it; a CUDA device that is not there is a :class:`DeviceError`
    (one sentence, instead of CUDA's own error at the first tensor moved)."""
    if device.type != "cuda":
        return device
    name = f"cuda:{device.index}" if device.index is not None else "cuda"
    if not torch.cuda.is_available():
        raise DeviceError(f"{option} {name}: PyTorch sees no CUDA GPU on this machine; use --device cpu (or auto)")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceError(f"{option} {name}: this machine has {count} CUDA GPU{'' if count == 1 else 's'} "
                          f"(cuda:0 to cuda:{count - 1})")
    return device


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
