"""What weights files each step of a manifest loads, whether they are here, and how to get the missing ones.

``pipeline run --dry-run`` prints :func:`weights_report` after the plan: one line per step that loads a
file that is missing or corrupt, with the command that gets it (``pipeline weights fetch TEACHER``, or
for SalGAN's Lasagne release ``pipeline weights fetch salgan`` then ``pipeline weights convert``), and
then each such file's URL and the place it goes. Nothing here touches the network: cached files are
checked against their pinned sha256 (or called unverified).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from pipeline.manifest.format import Manifest


@dataclass(frozen=True)
class Need:
    spec: str  # a known name, URL or path, as the step's command would resolve it
    teacher: str | None = None  # the teacher it belongs to (for the fetch hint), if any


def _teacher(name, weights) -> list[Need] | str:
    from teachers.registry import required_weights

    if not name:
        return []
    specs = required_weights(str(name), None if weights is None else str(weights))
    if specs is None:
        return f"teacher {name} needs weights: give it `weights: PATH`"
    return [Need(s, str(name)) for s in specs]


def step_needs(command: str, settings: Mapping[str, object]) -> list[Need] | str:
    """The files a step of ``command`` with ``settings`` loads (a string: what is wrong instead)."""
    from students.registry import required_weights as student_weights

    if command == "label":
        return _teacher(settings.get("teacher"), settings.get("weights"))
    if command == "train":
        from students.registry import student_info

        student = str(settings.get("student"))
        options = {o.name: settings[o.name] for o in student_info(student).options if settings.get(o.name) is not None}
        needs = [Need(s) for s in student_weights(student, backbone_weights=str(settings.get("backbone_weights", "none")),
                                                  **options)]
        if settings.get("stage") == "hint":
            more = _teacher(settings.get("teacher"), settings.get("teacher_weights"))
            return more if isinstance(more, str) else needs + more
        return needs
    if command in ("eval", "predict", "profile"):
        if settings.get("teacher"):
            return _teacher(settings.get("teacher"), settings.get("weights"))
        if settings.get("student") and settings.get("weights"):
            student, weights = str(settings["student"]), str(settings["weights"])
            if weights == "imagenet":  # the ImageNet backbone alone (pipeline.score.predictors.build_predictor)
                return [Need(s) for s in student_weights(student, backbone_weights="imagenet")]
            return [Need(s) for s in student_weights(student, weights=weights)]
    return []


def _how(need: Need) -> str:
    from teachers.fetch import convert_hint, fetch_hint
    from teachers.registry import RELEASES
    from teachers.weights import KNOWN_WEIGHTS

    if need.spec in KNOWN_WEIGHTS or need.spec.startswith(("http://", "https://")):
        return fetch_hint(need.teacher) if need.teacher and fetch_hint(need.teacher) else \
            f"pipeline weights fetch {need.spec}"
    if need.teacher in RELEASES:
        return f"{fetch_hint(need.teacher)} && {convert_hint(need.teacher, dst=need.spec)}"
    return "no download is known: put the file there"


def _source(need: Need, st) -> str:
    """Where a missing file comes from and where it goes."""
    from teachers.registry import RELEASES
    from teachers.weights import KNOWN_WEIGHTS, cache_path

    if st.url:
        return f"{st.url} -> {st.path}"
    if need.teacher in RELEASES:
        release = RELEASES[need.teacher][0]
        return (f"converted from the authors' release {KNOWN_WEIGHTS[release].url} "
                f"(fetched to {cache_path(release)})")
    return f"a local file, expected at {st.path}"


def weights_report(manifest: Manifest) -> list[str]:
    """Lines for ``--dry-run``: each step's missing (or corrupt) weights and how to get them."""
    from teachers.weights import cached_state, describe

    states: dict[str, object] = {}
    rows, files, loaded = [], {}, 0
    for name, step in manifest.steps.items():
        needs = step_needs(step.command, step.settings)
        if isinstance(needs, str):
            rows.append(f"  {name}: {needs}")
            continue
        loaded += len(needs)
        bad = []
        for need in needs:
            if need.spec not in states:
                states[need.spec] = cached_state(need.spec)
            st = states[need.spec]
            if not st.ok:
                bad.append((need, st))
                files[need.spec] = (need, st)
        if bad:
            what = ", ".join(f"{describe(n.spec)} ({st.summary})" for n, st in bad)
            hows = list(dict.fromkeys(_how(n) for n, _ in bad))
            rows.append(f"  {name}: {what} -> {'; '.join(hows)}")
    if not loaded and not rows:
        return ["weights: no step loads any"]
    if not rows:
        return [f"weights: every file the steps load is here ({len(states)} file{'s' if len(states) != 1 else ''})"]
    out = ["weights missing (steps that load them, and how to get them; `pipeline weights fetch` needs network):",
           *rows]
    if files:
        out.append("where they go:")
        for spec, (need, st) in files.items():
            out.append(f"  {describe(spec)}: {_source(need, st)}" + (f" ({st.detail})" if st.state == "corrupt" else ""))
    return out
