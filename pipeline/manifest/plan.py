"""Deciding what to run: a pure function of the declaration, the recorded state and the outputs' check.

Like DVC's ``dvc.yaml`` / ``dvc.lock``: the manifest says what should be, the state file
(``<workdir>/.pipeline/state.json``) records what was, and :func:`plan` compares the two.
It reads no file and runs nothing, so it is tested on its own.
"""

from __future__ import annotations

import json
from typing import Iterable, Mapping, NamedTuple

from pipeline.manifest.format import Manifest, Step

RUN, SKIP = "run", "skip"


class Planned(NamedTuple):
    step: str
    action: str  # "run" or "skip"
    reason: str


def record(manifest: Manifest, name: str, **fields) -> dict:
    """The state record of step ``name`` as declared now (the runner adds status, times, outputs)."""
    step = manifest.steps[name]
    return {"fingerprint": step.fingerprint, "command": step.command, "args": list(step.args),
            "settings": dict(step.settings), "needs": {n: manifest.steps[n].fingerprint for n in step.needs},
            "inputs": dict(step.inputs),
            "code_version": step.code_version, "output": step.output, **fields}


def _show(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def changes(old: Mapping, step: Step, manifest: Manifest) -> str:
    """Why the recorded fingerprint in ``old`` differs from ``step``'s, in words."""
    why = []
    if old.get("command") != step.command:
        why.append(f"command changed: {old.get('command')}→{step.command}")
    else:
        before, now = old.get("settings") or {}, dict(step.settings)
        diff = [f"{k} {_show(before.get(k))}→{_show(now.get(k))}"
                for k in list(now) + [k for k in before if k not in now] if before.get(k) != now.get(k)]
        if diff:
            why.append("settings changed: " + ", ".join(diff))
    old_needs = old.get("needs") or {}
    for name in step.needs:
        if name not in old_needs:
            why.append(f"now needs {name}")
        elif old_needs[name] != manifest.steps[name].fingerprint:
            why.append(f"upstream {name} changed")
    gone = [n for n in old_needs if n not in step.needs]
    if gone:
        why.append(f"no longer needs {', '.join(gone)}")
    if old.get("code_version") != step.code_version:
        why.append(f"code version changed: {old.get('code_version')}→{step.code_version}")
    old_inputs = old.get("inputs") or {}
    for path, digest in step.inputs.items():
        if path not in old_inputs:
            why.append(f"input added: {path}")
        elif old_inputs[path] != digest:
            why.append(f"input changed: {path}")
    for path in old_inputs:
        if path not in step.inputs:
            why.append(f"input removed: {path}")
    return "; ".join(why) or "fingerprint changed"


def _own_reason(step: Step, rec: Mapping | None, outputs_ok: Mapping[str, str], manifest: Manifest) -> str:
    """Why ``step`` must run considering only itself ("" when it is up to date)."""
    missing = [p for p, d in step.inputs.items() if d is None]
    if missing:
        return "input missing: " + ", ".join(missing)
    if rec is None:
        return "never run"
    if rec.get("fingerprint") != step.fingerprint:
        return changes(rec, step, manifest)
    if rec.get("status") == "running":
        return f"interrupted (started {rec.get('started', '?')})"
    if rec.get("status") != "done":
        return f"{rec.get('status', 'failed')} last time" + (f": {rec['error']}" if rec.get("error") else "")
    if outputs_ok.get(step.name):
        return f"outputs incomplete: {outputs_ok[step.name]}"
    return ""


def plan(manifest: Manifest, state: Mapping, outputs_ok: Mapping[str, str], *, force: Iterable[str] = (),
         only: Iterable[str] = (), until: Iterable[str] = ()) -> list[Planned]:
    """What to do with each step, in dependency order: ``Planned(step, "run" | "skip", reason)``.

    ``state`` is the state file's content; ``outputs_ok`` maps a step to "" when its recorded
    outputs are complete or to why not (steps left out count as complete). ``force`` steps and
    everything downstream of them run; ``only`` restricts the run to those steps, ``until`` to
    those steps and their upstream (both together: the union).
    """
    records = state.get("steps", {}) if state else {}
    force, only, until = list(force), list(only), list(until)
    selected = set(manifest.steps)
    if only or until:
        selected = set(only) | set(until) | manifest.upstream(until)
    forced_by: dict[str, str] = {}
    for name in manifest.steps:  # dependency order: a step's upstream is decided before it
        if name in force:
            forced_by[name] = name
        else:
            by = next((forced_by[u] for u in manifest.steps[name].needs if u in forced_by), None)
            if by is not None:
                forced_by[name] = by

    stale: dict[str, str] = {}  # would run if everything were selected
    out: list[Planned] = []
    actions: dict[str, str] = {}
    for name, step in manifest.steps.items():
        own = _own_reason(step, records.get(name), outputs_ok, manifest)
        if name in forced_by:
            reason = "forced" if forced_by[name] == name else f"forced (downstream of {forced_by[name]})"
            if own.startswith("input missing"):
                reason = own
        else:
            reason = own
        stale[name] = reason or next((f"upstream {u} is stale" for u in step.needs if stale.get(u)), "")
        if name not in selected:
            actions[name] = SKIP
            out.append(Planned(name, SKIP, "not selected" + (f" (stale: {stale[name]})" if stale[name] else "")))
            continue
        if not reason:
            running = [u for u in step.needs if actions.get(u) == RUN]
            if running:
                reason = f"upstream {', '.join(running)} {'runs' if len(running) == 1 else 'run'}"
        unselected = [u for u in step.needs if u not in selected and stale.get(u)]
        if reason and unselected:
            verb = "is" if len(unselected) == 1 else "are"
            reason += f" (warning: upstream {', '.join(unselected)} {verb} stale and not selected)"
        actions[name] = RUN if reason else SKIP
        out.append(Planned(name, actions[name], reason or "up to date"))
    return out
