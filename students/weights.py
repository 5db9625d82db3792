"""Loading a student's weights: torchvision ImageNet backbones and whole-student checkpoints."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Callable

from torch import nn

from teachers.weights import WeightsError, file_digest, load_state_dict, load_strict, resolve


def torchvision_backbone(weights) -> Path:
    """The file of a torchvision weights enum member (e.g. ``MobileNet_V2_Weights.IMAGENET1K_V1``).

    Taken from the torch hub cache where torchvision keeps it (downloaded when missing and online;
    offline, one error names the file, its URL and where to put it). Its sha256 must start with the
    hash in its file name, as torchvision checks.
    """
    url = weights.url
    path = resolve(url)
    prefix = re.search(r"-([0-9a-f]{8,})\.pth$", url).group(1)
    digest = file_digest(path)
    if not digest.startswith(prefix):
        raise WeightsError(f"{path} has sha256 {digest[:16]}…, but its name says {prefix}…: a corrupt or "
                           f"partial download; delete it to fetch it again from {url}")
    return path


def backbone_file(spec: str, imagenet: Callable[[], object], what: str) -> Path | None:
    """The file of a student's backbone weights: ``imagenet`` (torchvision's file of the weights enum member
    ``imagenet()`` gives), ``none`` (None) or a PATH / URL to a torchvision state dict of ``what``. A word that is
    none of these (``imagnet``) is said as such, not as a missing file among the teachers' weights names."""
    if spec == "none":
        return None
    if spec == "imagenet":
        return torchvision_backbone(imagenet())
    if re.fullmatch(r"[\w-]+", spec) and not Path(spec).exists():
        raise WeightsError(f"backbone weights {spec!r}: give imagenet, none or the path (or URL) of a torchvision "
                           f"{what} state dict")
    return resolve(spec)


def load_student_weights(model: nn.Module, spec: str, name: str,
                         convert: Callable[[dict], dict] | None = None) -> str:
    """Load ``spec`` (path, URL or known name) into ``model`` strictly; returns the file's sha256.

    A checkpoint of ``pipeline train`` (``{"model": …, "student": name}``) loads as is (another
    student's is refused); any other state dict goes through ``convert`` first (a publisher's layout).
    """
    path = resolve(spec)
    sd = load_state_dict(path)
    recorded = None
    if isinstance(sd.get("model"), dict):
        if sd.get("student") not in (None, name):
            raise WeightsError(f"{path} is a {sd['student']} checkpoint, not {name}")
        recorded = sd.get("student_options")
        sd = sd["model"]
    elif convert is not None:
        sd = convert(sd)
    load_strict(model, sd, what=f"{name} weights {path}")
    if isinstance(recorded, dict):
        _options_differ(model, recorded, name, path)
    return file_digest(path)


class OptionsDiffer(UserWarning):
    """A checkpoint's tensors fit this student, but it was trained with other options that change its maps."""


def _options_differ(model: nn.Module, recorded: dict, name: str, path) -> None:
    """Warn (:class:`OptionsDiffer`) when ``model`` was built with other options than the checkpoint records,
    leaving out those that weight the training loss alone (the strict load has refused those that change tensors;
    what is left, SACT's ``tile``, changes the maps silently)."""
    from students.registry import student_info

    loss_only = {o.name for o in student_info(name).options if o.training_only}
    ours = model.options()
    differ = sorted(k for k, v in recorded.items() if k in ours and ours[k] != v and k not in loss_only)
    if differ:
        warnings.warn(OptionsDiffer(
            f"{path} was trained as {name} with {', '.join(f'{k} {recorded[k]}' for k in differ)}; this {name} has "
            f"{', '.join(f'{k} {ours[k]}' for k in differ)}, so its maps are not those it learnt: build it with the "
            "options the checkpoint records (its student_options)"), stacklevel=3)
