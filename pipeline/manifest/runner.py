"""Executing a manifest: the state file, the workdir lock, and running stale steps as subprocesses.

Each step runs as ``python -m pipeline <command> <args>`` in its own process (its own Ray, its
own crash domain); an interrupted step resumes through the command's own mechanism when it is
run again (finished shards are skipped by ``pipeline label``). Independent steps may run at the
same time, up to ``jobs`` and within the machine's CPUs and GPUs; a step sees only the GPUs it
was given (``CUDA_VISIBLE_DEVICES``).

State lives in ``<workdir>/.pipeline/state.json`` (written atomically after every change),
apart from the manifest; ``<workdir>/.pipeline/lock`` keeps a second runner out of the workdir. When a
step finishes, the digest of its output is recorded: the fingerprints of the steps below it are made
with it (:func:`pipeline.manifest.plan.fingerprint_of`), and a step planned only because its upstream
runs is skipped when the upstream's new output has the digest it was made from.

Each step runs in its own process group (Ctrl-C and SIGTERM reach the runner, which stops the steps'
groups); on Linux a step also gets SIGKILL when the runner dies (``PR_SET_PDEATHSIG``), so a runner
killed with SIGKILL leaves no step behind. A step whose output folder is locked by another process
(another ``pipeline train`` on the run folder…) is not started.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import click

from pipeline.common.atomic import write_json
from pipeline.common.errors import error_message
from pipeline.common.storage import RemotePath, as_path, is_url
from pipeline.common.locks import FolderLock, LockHeld
from pipeline.common.locks import status as lock_status
from pipeline.common.tables import table
from pipeline.manifest.format import Manifest
from pipeline.manifest.plan import RUN, Planned, continues, matches, own_reason, plan, record
from pipeline.manifest.steps import COMMANDS, made_since, pieces_now

STATE_VERSION = 2  # 2: fingerprints with the upstream steps' output digests
PROGRESS_EVERY_S = 15.0  # at most one progress-bar line per step this often in the streamed output
#: thread-count variables set to the step's ``cpus`` in its environment, unless already set
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
LOCK_GRACE_S = 10.0  # how long a step waits for its output folder's lock before it is not started


class RunnerError(click.ClickException):
    """The run cannot start (workdir locked, state unreadable…)."""


# -- state ---------------------------------------------------------------------------------------

def state_path(workdir: Path | RemotePath) -> Path | RemotePath:
    return as_path(workdir) / ".pipeline" / "state.json"


def load_state(workdir: Path) -> dict:
    path = state_path(workdir)
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return {"version": STATE_VERSION, "steps": {}}
    except OSError as e:
        raise RunnerError(f"cannot read the state file {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunnerError(f"cannot read the state file {path}: {e}; delete it to start over") from None
    if not isinstance(state, dict) or not isinstance(state.get("steps"), dict) or not all(
            isinstance(record, dict) and all(record.get(k) is None or isinstance(record[k], t)
                                             for k, t in RECORD_TYPES.items())
            for record in state["steps"].values()):
        raise RunnerError(f"{path} is not a state file of `pipeline run`; delete it to start over")
    return state


#: the type of each field of a step's record that the runner reads as such (None, or absent, is allowed): a
#: hand-edited record of other types was a traceback
RECORD_TYPES = {"settings": dict, "needs": dict, "inputs": dict, "args": list, "fingerprint": str, "status": str,
                "command": str, "code_version": str, "output": str, "started": str, "ended": str}


def save_state(workdir: Path, state: dict) -> None:
    try:
        write_json(state_path(workdir), state)
    except OSError as e:  # a full disk: the old state file stays whole (written atomically)
        raise RunnerError(f"cannot write the state file {state_path(workdir)} ({error_message(e)}); any running step "
                          "was stopped, and the next run carries on from the last state written") from None


def now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def lock_path(workdir: Path | RemotePath) -> Path:
    """``<workdir>/.pipeline/lock``; object storage has no lock, so a workdir there is locked on this machine
    only, by a file in the user's cache named after its URL."""
    if isinstance(workdir, RemotePath) or is_url(workdir):
        key = hashlib.sha256(str(workdir).encode()).hexdigest()[:16]
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return cache / "pipeline" / "workdir-locks" / key / "lock"
    return Path(workdir) / ".pipeline" / "lock"


@contextlib.contextmanager
def workdir_lock(workdir: Path) -> Iterator[None]:
    """Hold ``<workdir>/.pipeline/lock`` (a lock file naming host and pid, see :mod:`pipeline.common.locks`) for
    the run; a second runner gets a clear error."""
    path = lock_path(workdir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunnerError(f"cannot create workdir {workdir} ({path.parent}: {e.strerror or e})") from None
    lock = FolderLock(path, what=f"workdir {workdir}", command="pipeline run")
    try:
        lock.acquire()
    except LockHeld as e:
        h = e.holder
        if h is None:
            raise RunnerError(str(e)) from None
        if h.host == socket.gethostname():
            raise RunnerError(f"another `pipeline run` (pid {h.pid}) is running in workdir {workdir}; wait for it to "
                              f"finish or stop it (lock: {lock.path})") from None
        raise RunnerError(f"another `pipeline run` (pid {h.pid} on host {h.host}) may be running in workdir "
                          f"{workdir}; this host cannot tell: if it is not, delete {lock.path}") from None
    except OSError as e:
        raise RunnerError(f"cannot lock workdir {workdir} ({lock.path}: {e.strerror or e})") from None
    for note in lock.notes:
        click.echo(note, err=True)
    if is_url(workdir):
        click.echo(f"note: workdir {workdir} is on object storage, which has no lock: this machine keeps a second "
                   "`pipeline run` out of it, another machine would not", err=True)
    try:
        yield
    finally:
        lock.release()


def runner_active(workdir: Path) -> bool:
    """Whether a runner holds the workdir's lock now."""
    return lock_status(lock_path(workdir))[0] == "held"


def output_locked_by(step, wait: float = 0.0) -> str:
    """"" when no other process holds the lock on ``step``'s output folder, else who does; a lock still held
    after ``wait`` seconds counts (a step process killed a moment ago may still be letting go of its flock)."""
    spec = COMMANDS.get(step.command)
    lock = spec.lock(as_path(step.output)) if spec is not None and spec.lock is not None and step.output else None
    if lock is None:
        return ""
    deadline = time.monotonic() + wait
    while True:
        state, holder = lock_status(lock)
        if state != "held":
            return ""
        if time.monotonic() >= deadline:
            return holder.describe() if holder is not None else "a process on this host"
        time.sleep(0.1)


def check_outputs(manifest: Manifest, state: Mapping, checksums: bool = False,
                  names: Iterable[str] | None = None) -> dict[str, str]:
    """For steps recorded done with their current fingerprint (those of ``names``, default all): "" when their
    outputs are complete and still what the step made, else why not. What a complete output records of itself
    (a run folder's latest checkpoint, a label folder's index) is compared with the digest recorded when the
    step finished (a command run by hand into it since is noticed); with ``checksums``, the content of every
    complete output is also digested and compared (a file emptied or edited since is made again)."""
    records = state.get("steps", {})
    out = {}
    for name in (manifest.steps if names is None else names):
        step = manifest.steps[name]
        rec = records.get(name)
        spec = COMMANDS.get(step.command)
        if (rec and rec.get("status") == "done" and matches(rec, manifest, name, state)
                and spec is not None and spec.verify is not None and step.output):
            out[name] = spec.verify(as_path(step.output), checksums)
            recorded = rec.get("output_digest")
            if not out[name] and spec.recorded_digest is not None and recorded:
                try:
                    found = spec.recorded_digest(as_path(step.output))
                except Exception:  # noqa: BLE001 - complete by its verify: its own records are the content's to judge
                    found = None
                if found is not None and found != recorded:
                    what = "its latest checkpoint" if step.command == "train" else "its index of shards"
                    out[name] = f"{step.output} changed since the step made it ({what} is not what it made: a command " \
                                "run by hand?)"
                    continue
            if checksums and not out[name] and spec.digest is not None and recorded:
                try:
                    found = spec.digest(as_path(step.output))
                except Exception as e:  # noqa: BLE001 - complete by its verify, but its content cannot be read
                    found = f"unreadable ({type(e).__name__})"
                if found != recorded:
                    out[name] = f"{step.output} changed since the step made it (its content digest differs)"
    return out


def make_plan(manifest: Manifest, state: Mapping, *, checksums: bool = False, **selection) -> list[Planned]:
    return plan(manifest, state, check_outputs(manifest, state, checksums), **selection)


#: how a step starts over (:func:`fresh_start`): anew (the command's ``fresh`` arguments: forced, or a setting
#: its outputs do not record changed), or redoing what changed (its ``changed`` arguments where it has them)
ANEW, CHANGED = "anew", "changed"


def fresh_start(manifest: Manifest, state: Mapping, item: Planned) -> str:
    """How the step should start over ("" when it resumes): :data:`ANEW` when it is forced, :data:`CHANGED` when
    its outputs are from other settings or inputs (unless the only change is a setting the command may grow, as
    ``train``'s epochs: then it carries on), or :data:`ANEW` again when a changed setting is one its outputs do
    not record (a label step's ``shard_size``: ``--overwrite-changed`` would keep every shard)."""
    rec = state.get("steps", {}).get(item.step)
    step = manifest.steps[item.step]
    if item.reason.startswith("forced"):
        return ANEW
    spec = COMMANDS.get(step.command)
    if rec is not None and rec.get("fresh") and rec.get("status") != "done":  # a start-over that did not finish
        kind = CHANGED if rec["fresh"] == CHANGED else ANEW  # (older state files: true)
        if kind == CHANGED and spec is not None and spec.changed:
            return CHANGED  # its command carries on by the same arguments, keeping what it made
        if not _made_since(spec, step.output, rec.get("started"), rec.get("pieces_before")):
            return kind  # nor made anything yet: it starts over again
        if spec is not None and spec.changed:  # made pieces of its own: kept, and what is still of the old
            return CHANGED  # settings redone (resumed plainly, `label` refuses a folder of two settings)
    if item.reason.startswith("outputs incomplete") and spec is not None and spec.resumes is not None:
        return "" if spec.resumes(as_path(step.output)) else ANEW  # nothing to carry on from
    if rec is None or matches(rec, manifest, item.step, state):
        return ""
    if spec is not None and continues(manifest, item.step, state, spec.grows):
        return ""
    before, now = manifest.portable(rec.get("settings") or {}), dict(step.recorded_settings)
    changed = {k for k in set(before) | set(now) if before.get(k) != now.get(k)}
    return CHANGED if spec is not None and spec.changed and changed <= spec.redoes else ANEW


def _made_since(spec, output, started, before) -> bool:
    """Whether a step's start-over (begun at ``started``, the record's time; ``before``: on object storage, the
    pieces its output held then) has made outputs of its own yet: the old outputs are gone then, and what is
    there is of the new settings (carry on from it)."""
    if spec is None or spec.pieces is None or not output or not started:
        return False
    try:
        since = datetime.fromisoformat(started).timestamp() + 1.0  # (recorded to the second, rounded down)
    except (TypeError, ValueError):
        return False
    return made_since(spec, as_path(output), since, before)


def command_line(manifest: Manifest, name: str, fresh: str) -> list[str]:
    """The step's command, with the arguments that start it over ``fresh`` (:func:`fresh_start`)."""
    step = manifest.steps[name]
    spec = COMMANDS.get(step.command)
    over = () if not fresh or spec is None else spec.changed if fresh == CHANGED and spec.changed else spec.fresh
    return [*step.command.split(), *step.args, *over]


# -- machine ---------------------------------------------------------------------------------------

def machine_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_gpus() -> list[str]:
    """GPU ids this process may hand out (from CUDA_VISIBLE_DEVICES when set)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [x.strip() for x in visible.split(",") if x.strip() and x.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no torch or no driver: no GPUs
        return []


# -- tables ----------------------------------------------------------------------------------------

def plan_table(planned: list[Planned]) -> str:
    return table(["step", "action", "reason"], [[p.step, p.action, p.reason] for p in planned])


# -- running ---------------------------------------------------------------------------------------

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _libc_prctl():
    """libc's ``prctl`` on Linux (looked up here, in the parent: the child only calls it), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def child_setup() -> Callable[[], None]:
    """A ``preexec_fn`` for a step: its own process group, SIGINT taken (a runner started in the background by a
    script, or by Slurm, has SIGINT ignored, which its children inherit: its stop, a SIGINT to each step, then went
    unheard for 10 s and ended in SIGKILL), and on Linux SIGKILL when the runner dies.

    The parent-death signal comes when the thread that started the child ends; the runner starts each step
    from a thread that waits for it, so that is when the runner itself dies. A runner that died before the
    child set it up is noticed by the parent pid having changed.
    """
    prctl, parent = _libc_prctl(), os.getpid()

    def setup() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # (Python then installs its KeyboardInterrupt handler)
        os.setpgid(0, 0)
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGKILL)
    return setup


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to the step's process group (the step and what it started)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _sigterm(signum, frame) -> None:
    raise KeyboardInterrupt  # stop the run like Ctrl-C: steps are stopped and recorded as interrupted


class Runner:
    """Runs the ``run`` steps of a plan as subprocesses, recording each in the state file."""

    def __init__(self, manifest: Manifest, state: dict, *, jobs: int = 1, keep_going: bool = False,
                 cpus: int | None = None, gpus: int | None = None, echo: Callable[..., None] = click.echo,
                 launcher: list[str] | None = None, checksums: bool = False):
        self.manifest, self.state, self.jobs, self.keep_going = manifest, state, jobs, keep_going
        self.checksums = checksums  # outputs re-checked before a step is skipped: with their sha256 too
        #: what runs `<command> <args>`; tests may put a fake program here
        self.launcher = launcher or [sys.executable, "-m", "pipeline"]
        self.cpus = cpus if cpus is not None else machine_cpus()
        ids = machine_gpus()
        self.gpu_ids = ids[:gpus] if gpus is not None and gpus <= len(ids) else (
            ids + [str(i) for i in range(len(ids), gpus)] if gpus is not None else ids)
        self.echo = echo
        self._print_lock = threading.Lock()
        self.procs: dict[str, subprocess.Popen] = {}

    # output ----------------------------------------------------------------------------------------
    def say(self, text: str, err: bool = False) -> None:
        with self._print_lock:
            self.echo(text, err=err)

    def _pump(self, name: str, stream, tail: deque) -> None:
        """Copy the step's output line by line with a ``[name]`` prefix; progress bars (\\r) are thinned."""
        buf, last_progress = b"", 0.0
        sep = re.compile(rb"\r\n|\r(?!\Z)|\n")

        def emit(raw: bytes, progress: bool) -> None:
            nonlocal last_progress
            text = raw.decode("utf-8", "replace").rstrip()
            if not text.strip():
                return
            if progress:
                if time.monotonic() - last_progress < PROGRESS_EVERY_S:
                    return
                last_progress = time.monotonic()
            else:
                tail.append(text)
            self.say(f"[{name}] {text}")

        while True:
            chunk = stream.read1(1 << 16)
            if not chunk:
                break
            buf += chunk
            while (m := sep.search(buf)) is not None:
                emit(buf[:m.start()], m.group() == b"\r")
                buf = buf[m.end():]
        if buf:
            emit(buf.rstrip(b"\r"), False)

    def _execute(self, name: str, argv: list[str], env: dict, results: queue.Queue) -> None:
        tail: deque = deque(maxlen=20)
        try:
            proc = subprocess.Popen([*self.launcher, *argv], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    preexec_fn=child_setup())
        except OSError as e:
            results.put((name, None, [f"cannot start: {e}"]))
            return
        self.procs[name] = proc
        try:
            self._pump(name, proc.stdout, tail)
        finally:
            rc = proc.wait()
            results.put((name, rc, list(tail)))

    def _save(self) -> None:
        save_state(self.manifest.workdir, self.state)

    def _finish(self, name: str, status: str, seconds: float, **fields) -> None:
        rec = self.state["steps"][name]
        rec.update(status=status, ended=now(), seconds=round(seconds, 3), **fields)
        if status == "done":
            rec.pop("error", None)
        self._save()

    # the loop --------------------------------------------------------------------------------------
    def run(self, planned: list[Planned]) -> tuple[int, list[list[str]]]:
        """Run the plan; returns (exit code, summary rows [step, action, status, seconds])."""
        m = self.manifest
        self.state.setdefault("steps", {})
        self.state.update(version=STATE_VERSION, manifest=str(m.path))
        self.todo = [p.step for p in planned if p.action == RUN]
        self.planned = {p.step: p for p in planned}
        self.status: dict[str, str] = {p.step: p.reason if p.action != RUN else "" for p in planned}
        self.seconds: dict[str, float] = {}
        self.failed: list[str] = []
        self.started: dict[str, float] = {}
        self.free_cpus, self.free_gpus = self.cpus, list(self.gpu_ids)
        self.held: dict[str, tuple[int, list[str]]] = {}
        self.results: queue.Queue = queue.Queue()
        self.stopping = False
        self._note_oversized()
        main = threading.current_thread() is threading.main_thread()
        old_term = signal.signal(signal.SIGTERM, _sigterm) if main else None
        old_int = signal.getsignal(signal.SIGINT) if main else None
        try:
            pending = list(self.todo)
            while pending or self.started:
                self._start_ready(pending)
                if not self.started:
                    break
                self._collect()
        except KeyboardInterrupt:
            if main:  # a second Ctrl-C (or SIGTERM) must not cut short the steps' stop and their records
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self._interrupt()
            code = 130
        except RunnerError:  # the state cannot be written: stop the steps, leave the last state written
            self._interrupt(record=False)
            raise
        else:
            code = 1 if self.failed else 0
        finally:
            if main:
                signal.signal(signal.SIGTERM, old_term if old_term is not None else signal.SIG_DFL)
                signal.signal(signal.SIGINT, old_int if old_int is not None else signal.default_int_handler)
        return code, self._summary(planned)

    def _note_oversized(self) -> None:
        for name in self.todo:
            r = self.manifest.steps[name].resources
            if r.gpus > len(self.gpu_ids) or r.cpus > self.cpus:
                self.say(f"note: step {name} asks for {r.cpus} CPU(s) and {r.gpus} GPU(s); this machine has "
                         f"{self.cpus} and {len(self.gpu_ids)}: it runs with what there is")

    def _blocked_by(self, name: str) -> str | None:
        for u in self.manifest.steps[name].needs:
            if u in self.failed or (self.status.get(u) or "").startswith("not run"):
                return u
        return None

    def _start_ready(self, pending: list[str]) -> None:
        """Start every pending step whose upstream is done, within ``jobs`` and the free CPUs and GPUs."""
        for name in list(pending):
            if self.stopping:
                break
            step = self.manifest.steps[name]
            up = self._blocked_by(name)
            if up is not None:
                pending.remove(name)
                self.status[name] = f"not run: upstream {up} {'failed' if up in self.failed else 'not run'}"
                continue
            if any(u in pending or u in self.started for u in step.needs):
                continue
            if len(self.started) >= self.jobs:
                break
            cpus = min(step.resources.cpus, self.cpus)
            gpus = min(step.resources.gpus, len(self.gpu_ids))
            if cpus > self.free_cpus or gpus > len(self.free_gpus):
                continue  # wait for resources; a smaller independent step may go first
            pending.remove(name)
            self._start(name, cpus, gpus)

    def _start(self, name: str, cpus: int, gpus: int) -> None:
        m, step = self.manifest, self.manifest.steps[name]
        missing = [p for p, d in step.inputs.items() if d is None]
        if not missing and not self.planned[name].reason.startswith("forced") and not own_reason(
                m, name, self.state, check_outputs(m, self.state, self.checksums, names=[name])):
            # it was to run because an upstream step ran, and that step's new output is the one it was made from
            self.status[name] = "up to date: upstream output unchanged"
            self.say(f"[{name}] up to date: its upstream output is unchanged")
            return
        if missing:  # not started: its record (what it last ran with) stays as it is, so the input back
            why = f"input missing: {', '.join(missing)}"  # unchanged, the step is what it was
            self.status[name] = f"failed: {why}"
            self.failed.append(name)
            self.say(f"[{name}] failed: {why}", err=True)
            self.stopping = self.stopping or not self.keep_going
            return
        holder = output_locked_by(step, wait=LOCK_GRACE_S)
        if holder:  # not started: its record keeps what it last ran with (a start-over asked for did not begin,
            # and what the other process writes there meanwhile is not this step's), marked failed
            why = (f"output folder {step.output} is locked by another process ({holder}); not started: wait for "
                   "it to finish or stop it")
            self.state["steps"].setdefault(name, record(m, name, self.state))
            self._failed(name, 0.0, why, f"failed: {why}", announce=f"[{name}] failed: ")
            return
        fresh = fresh_start(m, self.state, self.planned[name])
        spec = COMMANDS.get(step.command)
        before = pieces_now(spec, as_path(step.output)) if fresh and spec is not None and step.output else None
        self.state["steps"][name] = record(m, name, self.state, status="running", started=now(), fresh=fresh,
                                           **({} if before is None else {"pieces_before": before}))
        self._save()
        gpu_ids, self.free_gpus = self.free_gpus[:gpus], self.free_gpus[gpus:]
        self.free_cpus -= cpus
        self.held[name] = (cpus, gpu_ids)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for var in THREAD_VARS:  # a step computes on the CPUs it holds (spinning extra threads on a busy
            env.setdefault(var, str(cpus))  # machine can make a CPU step many times slower); the user's setting wins
        if self.gpu_ids:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_ids)
        argv = command_line(m, name, fresh)
        self.say(f"[{name}] $ pipeline {shlex.join(argv)}")
        self.started[name] = time.monotonic()
        threading.Thread(target=self._execute, args=(name, argv, env, self.results), daemon=True).start()

    def _collect(self) -> None:
        """Wait for one running step to end; record it done or failed and free what it held."""
        while True:
            try:
                name, rc, tail = self.results.get(timeout=0.5)
                break
            except queue.Empty:
                continue
        # to the millisecond, as the state records it: `status` and the report print that value (12.34996 s read
        # 12.3 here beside their 12.4)
        self.seconds[name] = round(time.monotonic() - self.started.pop(name), 3)
        self.procs.pop(name, None)
        cpus, gpu_ids = self.held.pop(name)
        self.free_cpus += cpus
        self.free_gpus += gpu_ids
        step = self.manifest.steps[name]
        why = self._why_failed(step, rc, tail)
        digest = None
        if not why:
            try:
                digest = self._output_digest(step)
            except Exception as e:  # noqa: BLE001 - complete, but its content cannot be read
                why = f"outputs unreadable after the run: {type(e).__name__}: {e}"
        if why:
            self._failed(name, self.seconds[name], why, f"failed ({why})", returncode=rc,
                         announce=f"[{name}] failed after {self.seconds[name]:.1f} s: ")
        else:
            self._finish(name, "done", self.seconds[name], returncode=0, output_digest=digest)
            self.status[name] = "done"
            self.say(f"[{name}] done in {self.seconds[name]:.1f} s")

    def _output_digest(self, step) -> str:
        """The digest of the step's output content (its fingerprint for a command without one)."""
        spec = COMMANDS.get(step.command)
        if spec is not None and spec.digest is not None and step.output:
            return spec.digest(as_path(step.output))
        return "fingerprint:" + self.state["steps"][step.name]["fingerprint"]

    @staticmethod
    def _why_failed(step, rc: int | None, tail: list[str]) -> str:
        """"" when the step's process succeeded and its outputs are complete, else why not."""
        if rc == 0:
            spec = COMMANDS.get(step.command)
            if spec is not None and spec.verify is not None and step.output:
                out = as_path(step.output)  # written by the step's own process: no listing cached before it
                why = spec.verify(out.forget_listings() if isinstance(out, RemotePath) else out, False)
                return f"outputs incomplete after the run: {why}" if why else ""
            return ""
        if rc is not None and rc < 0:  # ended by a signal (e.g. the kernel's out-of-memory killer: SIGKILL)
            try:
                why = f"killed by {signal.Signals(-rc).name}"
            except ValueError:
                why = f"killed by signal {-rc}"
        else:
            why = f"exit code {rc}" if rc is not None else tail[-1]
        last = next((line for line in reversed(tail) if line.strip()), "")
        return why + (f": {last.strip()}" if last and rc is not None else "")

    def _failed(self, name: str, seconds: float, why: str, status: str, announce: str, **fields) -> None:
        spec = COMMANDS.get(self.manifest.steps[name].command)
        force = ""
        if spec is not None and any(flag.split("=")[0] in why for flag in spec.fresh):  # the command's advice
            force = (f"in a manifest, `--force {name}` added to this `pipeline run` starts step {name} over "
                     f"({' '.join(spec.fresh)})")
        # (the hint goes with the error into the state, which `pipeline status` and the report show)
        self._finish(name, "failed", seconds, error=why + (f" [{force}]" if force else ""), **fields)
        self.status[name] = status
        self.failed.append(name)
        self.say(announce + why, err=True)
        if force:
            self.say(f"note: {force}", err=True)
        self.stopping = self.stopping or not self.keep_going

    def _summary(self, planned: list[Planned]) -> list[list[str]]:
        for name in self.todo:
            if not self.status[name]:
                self.status[name] = (f"not run: stopped after {', '.join(self.failed)} failed" if self.failed
                                     else "not run")
        if self.failed:
            self.say(f"Error: step{'s' if len(self.failed) > 1 else ''} failed: {', '.join(self.failed)}", err=True)
        return [[p.step, p.action, self.status[p.step] if p.action == RUN else p.reason,
                 f"{self.seconds[p.step]:.1f}" if p.step in self.seconds else "-"] for p in planned]

    def _interrupt(self, record: bool = True) -> None:
        """Stop running steps (SIGINT, then SIGKILL after 10 s) and record them as interrupted (``record``)."""
        for proc in list(self.procs.values()):
            _signal_group(proc, signal.SIGINT)
        deadline = time.monotonic() + 10
        for proc in list(self.procs.values()):
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
        if not record:
            return
        for name, t0 in self.started.items():
            self.seconds[name] = round(time.monotonic() - t0, 3)
            self._finish(name, "interrupted", self.seconds[name])
            self.status[name] = "interrupted"
        self.say("interrupted", err=True)


def run_manifest(manifest: Manifest, *, jobs: int = 1, force=(), only=(), until=(), keep_going: bool = False,
                 dry_run: bool = False, cpus: int | None = None, gpus: int | None = None, checksums: bool = False,
                 echo: Callable[..., None] = click.echo, launcher: list[str] | None = None) -> int:
    """Plan and run ``manifest``; returns the exit code (0: every step done or up to date)."""
    state = load_state(manifest.workdir)
    selection = {"force": force, "only": only, "until": until}
    if dry_run:
        planned = make_plan(manifest, state, checksums=checksums, **selection)
        active = runner_active(manifest.workdir)
        if active:  # its "running" steps are being run, not interrupted
            records = {n: r for n, r in state.get("steps", {}).items() if isinstance(r, dict)}
            planned = [p._replace(reason=f"running now (started {records[p.step].get('started', '?')})")
                       if records.get(p.step, {}).get("status") == "running" else p for p in planned]
        echo(f"plan for {manifest.path} (workdir {manifest.workdir}"
             f"{'; a runner is active: its steps are running now' if active else ''}):")
        echo(plan_table(planned))
        runs = [p for p in planned if p.action == RUN]
        if runs:
            echo("")
        for p in runs:
            echo(f"{p.step}: pipeline {shlex.join(command_line(manifest, p.step, fresh_start(manifest, state, p)))}")
        for line in missing_paths(manifest, planned):
            echo(f"warning: {line}: `pipeline run` starts no step while it is missing", err=True)
        _echo_weights(manifest, echo)
        return 0
    def refused(planned) -> bool:
        missing = missing_paths(manifest, planned)
        for line in missing:  # a mistyped path, found before hours of the steps above it, not after
            echo(f"Error: {line}", err=True)
        return bool(missing)

    if refused(plan(manifest, load_state(manifest.workdir), {}, **selection)):  # (outputs unchecked: checked once,
        return 2  # below) before the lock: a refused run leaves nothing behind, not even the workdir
    with workdir_lock(manifest.workdir):
        state = load_state(manifest.workdir)  # as it is now that we hold the lock
        left = [r for r in state.get("steps", {}).values() if isinstance(r, dict) and r.get("status") == "running"]
        for rec in left:  # a killed runner's: not running now (`status` beside this runner would say they are)
            rec.update(status="interrupted", error="the `pipeline run` running it was stopped before it finished")
        if left:
            save_state(manifest.workdir, state)
        planned = make_plan(manifest, state, checksums=checksums, **selection)
        if refused(planned):
            return 2
        echo(f"plan for {manifest.path} (workdir {manifest.workdir}):")
        echo(plan_table(planned))
        t0 = time.monotonic()
        code, rows = Runner(manifest, state, jobs=jobs, keep_going=keep_going, cpus=cpus, gpus=gpus,
                            echo=echo, launcher=launcher, checksums=checksums).run(planned)
        echo("")
        echo(table(["step", "action", "status", "seconds"], rows))
        echo(f"total {time.monotonic() - t0:.1f} s")
        _echo_report(manifest, state, echo)
        return code


def missing_paths(manifest: Manifest, planned: Iterable[Planned]) -> list[str]:
    """``FILE:LINE: step 'x': --images PATH does not exist`` for each local path a step to run needs
    (:attr:`CommandSpec.must_exist`) that is not there and that no step of the manifest makes (it is not
    below, nor above, a step's output folder)."""
    outputs = [Path(s.output).resolve() for s in manifest.steps.values() if s.output and not is_url(s.output)]
    said = []
    for p in planned:
        if p.action != RUN:
            continue
        step = manifest.steps[p.step]
        for flag, path in step.paths:
            where = Path(path).resolve()
            if where.exists() or any(where.is_relative_to(o) or o.is_relative_to(where) for o in outputs):
                continue
            relative = "" if Path(path).is_absolute() else f" (relative to the current folder, {Path.cwd()})"
            said.append(f"{manifest.path}:{step.line}: step {p.step!r}: {flag} {path} does not exist{relative}")
    return said


def _echo_report(manifest: Manifest, state: Mapping, echo: Callable[..., None]) -> None:
    """The run's last words: every eval step's scores, and ``<workdir>/report.html`` (see manifest.report);
    a report that cannot be written is a warning, never a failed run."""
    from pipeline.manifest.report import scores_table, speed_table, write_report

    try:
        states = step_states(manifest, state)  # (what `pipeline status` says: the tables' "(stale)" marks, the page)
        scores, speed = scores_table(manifest, state, states), speed_table(manifest, state, states)
    except Exception as e:  # noqa: BLE001 - a summary must not fail a finished run
        echo(f"warning: cannot read the eval or profile steps' outputs: {e}", err=True)
        states, scores, speed = None, None, None
    if scores:
        echo("")
        echo("scores (every eval step; on teacher labels they compare each model with the teacher's held-out maps):")
        echo(scores)
    if speed:
        echo("")
        echo("speed (every profile step, on its device):")
        echo(speed)
    if is_url(manifest.workdir):
        echo(f"report: not written for a workdir on object storage ({manifest.workdir}); the scores above sum it up")
        return
    try:
        path, written, warnings = write_report(manifest, state, states if states is not None else
                                               step_states(manifest, state))
    except Exception as e:  # noqa: BLE001
        echo(f"warning: cannot write the report in {manifest.workdir}: {type(e).__name__}: {e}", err=True)
        return
    for w in warnings:
        echo(f"warning: report: {w}", err=True)
    echo(f"report: {path}" + ("" if written else " (up to date)"))


def _echo_weights(manifest: Manifest, echo: Callable[..., None]) -> None:
    """The dry run's last section: each step's missing weights and how to get them (see manifest.needs)."""
    from pipeline.manifest.needs import weights_report

    echo("")
    for line in weights_report(manifest):
        echo(line)


def _when(rec: Mapping) -> str:
    stamp = rec.get("ended") or rec.get("started")
    if not stamp:
        return "-"
    try:
        text = datetime.fromisoformat(stamp).strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError):  # a state file edited by hand
        text = str(stamp)
    return text + (f" ({rec['seconds']:.1f} s)" if isinstance(rec.get("seconds"), (int, float)) else "")


def status_rows(manifest: Manifest, state: Mapping, *, checksums: bool = False,
                active: bool = False) -> list[list[str]]:
    """[step, state, last run, output] for each step (``active``: a runner holds the workdir now)."""
    records = state.get("steps", {})
    outputs = check_outputs(manifest, state, checksums)
    planned = plan(manifest, state, outputs)
    stale = {p.step for p in planned if p.action == RUN}
    rows = []
    for p in planned:
        rec = records.get(p.step)
        if p.action != RUN:
            text = "up to date"
        elif rec is None:
            text = "never run" + (f"; {p.reason}" if p.reason != "never run" else "")
        elif rec.get("status") == "running" and active:
            text = "running"
        elif rec.get("status") == "failed" and matches(rec, manifest, p.step, state):
            text = "failed" + (f": {rec['error']}" if rec.get("error") else "")
        elif own_reason(manifest, p.step, state, outputs):
            text = f"stale: {p.reason}"
        else:  # planned only because its upstream would run ("upstream X runs"): nothing runs now
            up = [u for u in manifest.steps[p.step].needs if u in stale]
            text = f"stale: upstream {', '.join(up)} {'is' if len(up) == 1 else 'are'} stale"
        rows.append([p.step, text, _when(rec) if rec else "-", manifest.steps[p.step].output or "-"])
    return rows


def step_states(manifest: Manifest, state: Mapping) -> dict[str, str]:
    """{step: what ``pipeline status`` says of it} (``up to date``, ``stale: why``, ``failed: its error``…)."""
    return {row[0]: row[1] for row in status_rows(manifest, state)}
