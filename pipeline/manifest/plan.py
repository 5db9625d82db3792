"""Deciding what to run: a pure function of the declaration, the recorded state and the outputs' check.

Like DVC's ``dvc.yaml`` / ``dvc.lock``: the manifest says what should be, the state file
(``<workdir>/.pipeline/state.json``) records what was, and :func:`plan` compares the two.
It reads no file and runs nothing, so it is tested on its own.

A step's fingerprint (:func:`fingerprint_of`) is its own fingerprint (command, settings, inputs, code
version: :attr:`~pipeline.manifest.format.Step.own_fingerprint`) with the digests of what the steps it
needs produced, as the state file records them (``output_digest``, written by the runner when a step
finishes). A step therefore re-runs when an upstream output's content changed, whatever made it change,
and not when an upstream re-ran and produced the same thing.
"""

from __future__ import annotations

import hashlib
import json
from typing import Iterable, Mapping, NamedTuple

from pipeline.manifest.format import Manifest, Step

RUN, SKIP = "run", "skip"


class Planned(NamedTuple):
    step: str
    action: str  # "run" or "skip"
    reason: str


def output_digest(state: Mapping | None, name: str) -> str | None:
    """The digest of step ``name``'s output as the state records it from its last successful run, or None."""
    rec = ((state or {}).get("steps") or {}).get(name)
    return rec.get("output_digest") if rec and rec.get("status") == "done" else None


def upstream_digests(manifest: Manifest, name: str, state: Mapping | None) -> dict[str, str | None]:
    """The recorded output digest of each step ``name`` needs."""
    return {u: output_digest(state, u) for u in manifest.steps[name].needs}


def _fingerprint(own: str, needs: Mapping[str, str | None]) -> str:
    doc = {"own": own, "needs": dict(sorted(needs.items()))}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def fingerprint_of(manifest: Manifest, name: str, state: Mapping | None) -> str:
    """Step ``name``'s fingerprint: its own fingerprint and its upstream steps' recorded output digests."""
    return _fingerprint(manifest.steps[name].own_fingerprint, upstream_digests(manifest, name, state))


def matches(rec: Mapping | None, manifest: Manifest, name: str, state: Mapping | None) -> bool:
    """Whether the record ``rec`` was made with step ``name`` as it is now (:func:`fingerprint_of`). An upstream
    step renamed in the manifest whose output is where it was, with the digest the record was made from, is the
    same input (:func:`same_upstream`): the steps below it are not made again for a new name."""
    if not rec:
        return False
    if rec.get("fingerprint") == fingerprint_of(manifest, name, state):
        return True
    before = rec.get("needs")
    return (isinstance(before, dict) and rec.get("fingerprint") == _fingerprint(manifest.steps[name].own_fingerprint,
                                                                                before)  # its own part unchanged
            and same_upstream(before, manifest, name, state))


def same_upstream(before: Mapping, manifest: Manifest, name: str, state: Mapping | None) -> bool:
    """Whether ``before``, the upstream output digests a record of step ``name`` was made from, are those it
    needs now: the same steps' digests, or, where upstream steps were renamed, output by output (each old name's
    output as the state still records it, with its digest, is a new name's)."""
    now = upstream_digests(manifest, name, state)
    if dict(before) == now:
        return True
    records = (state or {}).get("steps") or {}
    if set(before) == set(now) or not all(isinstance(d, str) for d in [*before.values(), *now.values()]):
        return False
    outputs = {u: (records.get(u) or {}).get("output") for u in before}  # (a record gone: no pairing)
    if None in outputs.values():
        return False
    old = {_portable_path(manifest, outputs[u]): d for u, d in before.items()}
    new = {_portable_path(manifest, manifest.steps[u].output): d for u, d in now.items()}
    return len(old) == len(before) and old == new


def _portable_path(manifest: Manifest, path) -> str:
    """``path`` with this workdir as ``${workdir}`` (an output recorded so is the same in a moved workdir)."""
    return manifest.portable({"path": str(path)})["path"]


def record(manifest: Manifest, name: str, state: Mapping | None = None, **fields) -> dict:
    """The state record of step ``name`` as declared now, its upstream outputs as ``state`` records them (the
    runner adds status, times, its output's digest)."""
    step = manifest.steps[name]
    return {"fingerprint": fingerprint_of(manifest, name, state), "own_fingerprint": step.own_fingerprint,
            "command": step.command, "args": list(step.args), "settings": dict(step.recorded_settings),
            "needs": upstream_digests(manifest, name, state), "inputs": dict(step.recorded_inputs),
            "code_version": step.code_version,
            "output": None if step.output is None else _portable_path(manifest, step.output), **fields}


def continues(manifest: Manifest, name: str, state: Mapping | None, grows: Iterable[str]) -> bool:
    """Whether step ``name``'s only change since its recorded run is a larger value of settings in ``grows``
    (``train``'s epochs): then it carries on from where it stopped instead of starting over."""
    rec = ((state or {}).get("steps") or {}).get(name)
    step, grows = manifest.steps[name], set(grows)
    if not rec or not grows or rec.get("command") != step.command:
        return False
    if (not same_upstream(rec.get("needs") or {}, manifest, name, state)
            or manifest.portable(rec.get("inputs") or {}, keys=True) != dict(step.recorded_inputs)
            or rec.get("code_version") != step.code_version):
        return False
    before, now = manifest.portable(rec.get("settings") or {}), dict(step.recorded_settings)
    if set(before) != set(now):
        return False
    for k in now:
        if before[k] == now[k]:
            continue
        if k not in grows or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (before[k], now[k])) \
                or now[k] < before[k]:
            return False
    return True


def _show(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def changes(old: Mapping, step: Step, manifest: Manifest, state: Mapping | None = None) -> str:
    """Why the recorded fingerprint in ``old`` differs from ``step``'s, in words."""
    why = []
    if old.get("command") != step.command:
        why.append(f"command changed: {old.get('command')}→{step.command}")
    else:
        before, now = manifest.portable(old.get("settings") or {}), dict(step.recorded_settings)
        diff = [f"{k} {_show(before.get(k))}→{_show(now.get(k))}"
                for k in list(now) + [k for k in before if k not in now] if before.get(k) != now.get(k)]
        if diff:
            why.append("settings changed: " + ", ".join(diff))
    old_needs = old.get("needs") or {}
    if same_upstream(old_needs, manifest, step.name, state):  # (upstream steps renamed, their outputs the same)
        old_needs = upstream_digests(manifest, step.name, state)
    for name, digest in upstream_digests(manifest, step.name, state).items():
        if name not in old_needs:
            why.append(f"now needs {name}")
        elif old_needs[name] != digest:
            why.append(f"upstream {name}'s output changed" if digest is not None
                       else f"upstream {name} has no finished output")
    gone = [n for n in old_needs if n not in step.needs]
    if gone:
        why.append(f"no longer needs {', '.join(gone)}")
    if old.get("code_version") != step.code_version:
        why.append(f"code version changed: {old.get('code_version')}→{step.code_version}")
    old_inputs = manifest.portable(old.get("inputs") or {}, keys=True)
    for path, digest in step.recorded_inputs.items():
        if path not in old_inputs:
            why.append(f"input added: {path}")
        elif old_inputs[path] != digest:
            why.append(f"input changed: {path}")
    for path in old_inputs:
        if path not in step.recorded_inputs:
            why.append(f"input removed: {path}")
    return "; ".join(why) or "fingerprint changed"


def own_reason(manifest: Manifest, name: str, state: Mapping | None, outputs_ok: Mapping[str, str]) -> str:
    """Why step ``name`` must run considering only itself and its upstream's recorded outputs ("" when it is up
    to date)."""
    step = manifest.steps[name]
    rec = ((state or {}).get("steps") or {}).get(name)
    missing = [p for p, d in step.inputs.items() if d is None]
    if missing:
        return "input missing: " + ", ".join(missing)
    if rec is None:
        return "never run"
    if not matches(rec, manifest, name, state):
        return changes(rec, step, manifest, state)
    if rec.get("status") == "running":
        return f"interrupted (started {rec.get('started', '?')})"
    if rec.get("status") != "done":
        return f"{rec.get('status', 'failed')} last time" + (f": {rec['error']}" if rec.get("error") else "")
    if outputs_ok.get(step.name):
        return f"outputs incomplete: {outputs_ok[step.name]}"
    return ""


def selection(manifest: Manifest, only: Iterable[str] = (), until: Iterable[str] = ()) -> set[str]:
    """The steps ``--only`` and ``--until`` select (every step when neither is given): those named by ``only``,
    and those named by ``until`` with their upstream."""
    only, until = list(only), list(until)
    if not (only or until):
        return set(manifest.steps)
    return set(only) | set(until) | manifest.upstream(until)


def plan(manifest: Manifest, state: Mapping, outputs_ok: Mapping[str, str], *, force: Iterable[str] = (),
         only: Iterable[str] = (), until: Iterable[str] = ()) -> list[Planned]:
    """What to do with each step, in dependency order: ``Planned(step, "run" | "skip", reason)``.

    ``state`` is the state file's content (each step's record, with the digest of what it produced);
    ``outputs_ok`` maps a step to "" when its recorded outputs are complete or to why not (steps left out
    count as complete). A step whose upstream runs is planned to run; the runner skips it after all when
    the upstream's new output has the digest it was made from (:func:`own_reason` is "" then). ``force`` steps and
    everything downstream of them run; ``only`` restricts the run to those steps, ``until`` to
    those steps and their upstream (both together: the union).
    """
    force, only, until = list(force), list(only), list(until)
    selected = selection(manifest, only, until)
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
        own = own_reason(manifest, name, state, outputs_ok)
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
        warning = ""
        if unselected:  # (said whether the step runs or not: its result is of the upstream's old output)
            verb = "is" if len(unselected) == 1 else "are"
            warning = f" (warning: upstream {', '.join(unselected)} {verb} stale and not selected)"
        actions[name] = RUN if reason else SKIP
        out.append(Planned(name, actions[name], (reason or "up to date") + warning))
    return out
