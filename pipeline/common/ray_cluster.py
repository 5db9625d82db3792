"""Where every command gets its Ray: one embedded local Ray, or an existing cluster at ``--address``.

:func:`connect` is the only ``ray.init`` of the pipeline (the labelling driver and Ray Train use it):

* no address: an embedded local Ray, started explicitly local (``address="local"``), so a cluster that
  ``ray start`` recorded on this machine, live or dead, is never joined by accident. Its session folder lives
  in ``pipeline-ray-<uid>/<pid>`` under ``$RAY_TMPDIR`` (else the system temp folder), removed when the command
  ends; the folders of commands that were killed are pruned by the next one. Token authentication stays on (Ray's default for
  a new local cluster), without Ray's notice about it.
* an address (``host:port`` of a head's GCS, as ``ray start --head`` prints it): the cluster is probed first,
  so an unreachable address or a missing/wrong token is one sentence (a :class:`RayClusterError`) instead of
  Ray's retries and warnings. The token is found the way Ray documents it: ``RAY_AUTH_TOKEN``, else the file
  ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``; when the cluster asks for a token and
  ``RAY_AUTH_MODE`` is not set, token mode is turned on for this process. The variables that reach object
  storage (:func:`forwarded_env`: ``AWS_*``, ``GOOGLE_APPLICATION_CREDENTIALS``, ``FSSPEC_*``…) are passed to
  the job's workers (``runtime_env={"env_vars": …}``), so actors on other nodes read and write ``s3://…`` as
  this command does; their values are never printed.

When Ray is already initialised in this process (a test, a notebook), that Ray is used and left running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path
from typing import Mapping

from pipeline.common.locks import process_alive

AUTH_MODE = "RAY_AUTH_MODE"
TOKEN_HINT = ("set RAY_AUTH_TOKEN to the cluster's token (`ray get-auth-token` on the head prints it) or "
              "RAY_AUTH_TOKEN_PATH to a file holding it")
#: the embedded local Ray's object store: small, the shards go to disk, not through it
LOCAL_OBJECT_STORE = 256 * 1024**2


#: variables forwarded to a cluster's workers: these names, and those starting with these prefixes
FORWARD_NAMES = ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT", "STORAGE_EMULATOR_HOST")
FORWARD_PREFIXES = ("AWS_", "FSSPEC_", "AZURE_STORAGE_")


def forwarded_env(environ) -> dict[str, str]:
    """The variables of ``environ`` a cluster's workers need to reach object storage as this process does:
    S3's endpoint, region and credentials (``AWS_*``), Google Cloud Storage's (``GOOGLE_APPLICATION_CREDENTIALS``,
    ``GOOGLE_CLOUD_PROJECT``, ``STORAGE_EMULATOR_HOST``), Azure's (``AZURE_STORAGE_*``) and fsspec's own settings
    (``FSSPEC_*``). Nothing else: not Ray's (``RAY_*``, the token included), not ``PATH`` or ``HOME``."""
    return {k: v for k, v in environ.items() if k in FORWARD_NAMES or k.startswith(FORWARD_PREFIXES)}


class RayClusterError(Exception):
    """Ray could not be started or the cluster could not be reached (one sentence, what to set)."""


def temp_root() -> Path:
    """The folder that holds the session folders of embedded local Rays (one per running command)."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / f"pipeline-ray-{uid}"


def prune_temp(root: Path | None = None) -> None:
    """Remove the session folders of embedded Rays whose command is gone (killed, or crashed)."""
    root = root or temp_root()
    if not root.is_dir():
        return
    for d in root.iterdir():
        if d.name.isdigit() and (int(d.name) == os.getpid() or not process_alive(int(d.name))):
            shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (Ray's C++ client logs there directly) for the duration."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _token_source() -> str | None:
    """Where Ray would read the token from, as words (None when there is none)."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return f"RAY_AUTH_TOKEN_PATH ({path})" if Path(path).expanduser().is_file() else None
    default = Path.home() / ".ray" / "auth_token"
    return str(default) if default.is_file() else None


def split_address(address: str) -> tuple[str, int]:
    """A Ray cluster address as (host, port); :class:`RayClusterError` when it is not host:port."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise RayClusterError(f"--address {address!r} is not a Ray cluster address: give the head's host:port, "
                              "as `ray start --head` prints it (e.g. 10.0.0.5:6379)")
    return host.strip("[]"), int(port)


def _reachable(address: str, timeout: float = 10.0) -> None:
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        why = f"no answer in {timeout:.0f} s" if isinstance(e, socket.timeout) else (e.strerror or str(e) or
                                                                                    type(e).__name__)
        raise RayClusterError(
            f"no Ray cluster answers at {address} ({why.lower()}): "
            f"start one there (`ray start --head --port {port}`) or set --address / RAY_ADDRESS to the address "
            "`ray start --head` printed") from None


def _probe(address: str) -> None:
    """Ask the cluster's GCS for its id: raises Ray's AuthenticationError when the token is missing or wrong."""
    from ray._raylet import GcsClient

    with _quiet_stderr():
        GcsClient(address=address)


def _enable_token_mode() -> None:
    """Token authentication on for this process and the ones it starts, even after a first connection without
    it: Ray caches RAY_AUTH_MODE in its config and the token in its loader, so both are read again (as Ray
    2.59's own ``_enable_token_auth`` does; Ray 2.52–2.58 have no such function)."""
    os.environ[AUTH_MODE] = "token"
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def check_cluster(address: str) -> None:
    """Raise :class:`RayClusterError` (one sentence) unless the cluster at ``address`` answers and accepts us;
    turns token mode on for this process when the cluster needs it and a token is at hand."""
    from ray.exceptions import AuthenticationError

    _reachable(address)
    try:
        _probe(address)
        return
    except AuthenticationError:
        pass
    except Exception as e:  # noqa: BLE001 - the port answers, but not as a Ray GCS
        raise RayClusterError(f"{address} does not answer as a Ray cluster ({_first_line(e)}): set --address / "
                              "RAY_ADDRESS to the address `ray start --head` printed") from None
    mode = os.environ.get(AUTH_MODE, "").lower()
    source = _token_source()
    if mode == "disabled":
        raise RayClusterError(f"the Ray cluster at {address} requires token authentication and RAY_AUTH_MODE is "
                              f"'disabled' here: unset it (or set RAY_AUTH_MODE=token) and {TOKEN_HINT}")
    if source is None:
        raise RayClusterError(f"the Ray cluster at {address} requires token authentication and no token was "
                              f"found: {TOKEN_HINT}")
    if mode != "token":
        _enable_token_mode()
    try:
        _probe(address)
    except AuthenticationError:
        raise RayClusterError(f"the Ray cluster at {address} refused the authentication token from {source}: "
                              f"{TOKEN_HINT}") from None


def given_address(address: str | None) -> str | None:
    """The cluster a command is pointed at: ``address``, else ``$RAY_ADDRESS``; None for an embedded local Ray."""
    if address is None:
        address = os.environ.get("RAY_ADDRESS")
    return (address or "").strip() or None


def check_given(address: str | None) -> None:
    """:func:`check_cluster` on the cluster :func:`given_address` names, if it names a host:port (Ray Client
    URLs and ``auto``, Ray's own search, give their own errors; a local Ray needs no check)."""
    address = given_address(address)
    if address is not None and "://" not in address and address != "auto":
        check_cluster(address)


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


@contextlib.contextmanager
def _env(**values: str):
    """Set environment variables that are not set yet (Ray's processes inherit them); restore after."""
    added = [k for k in values if k not in os.environ]
    for k in added:
        os.environ[k] = values[k]
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _forward_only(actors: tuple[str, ...]) -> None:
    """Print the output of these actors' workers only (the pipeline's own: the shard labellers, the Ray Train
    workers), without Ray's ``(Actor pid=…)`` prefix; Ray's own actors (the Train controller and its helpers)
    stay in the session's log files. The raylet's and autoscaler's messages (a worker killed for memory…)
    still come through."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        from ray._private.worker import print_to_stdstream
    except ImportError:  # another Ray version: its own printing stays
        return

    def handler(data: dict) -> None:
        if data.get("actor_name") in actors or data.get("pid") in ("raylet", "autoscaler"):
            print_to_stdstream(data, ignore_prefix=data.get("actor_name") in actors)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", handler)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def interrupts_after():
    """Hold Ctrl-C (SIGINT) back for the block: yields a function that raises the KeyboardInterrupt that came
    meanwhile, to be called where it can be handled. For ``ray.init``: interrupted while it builds its core
    worker, Ray 2.60 is left half-connected, ``ray.shutdown`` does not stop it, and at exit its own clean-up
    races its threads and the interpreter dies of a segmentation fault. The handler that was there is
    called then (Python's default raises KeyboardInterrupt). Only in the main thread, and only where SIGINT has a
    handler: an ignored one (a background job) stays ignored.)"""
    came: list[int] = []
    before = signal.getsignal(signal.SIGINT)
    if not _main_thread() or not callable(before):
        yield lambda: None  # (SIGINT ignored, as in a background job, or fatal: left so)
        return
    signal.signal(signal.SIGINT, lambda signum, frame: came.append(signum))

    def interrupted() -> None:
        if came:
            before(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt

    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, before)


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM (``kill PID``, ``timeout``, Slurm, Kubernetes) handled as Ctrl-C for the block: a KeyboardInterrupt,
    so that the command stops as it does on Ctrl-C (one ``interrupted:`` line, finished work kept, Ray shut down
    and its session folder removed). Ray's driver otherwise took it in its C++ handler, which printed a crash
    dump and ended the process with Ray's folders left behind. Only in the main thread; the handler that was
    there is put back after."""
    if not _main_thread():
        yield
        return

    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before if before is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _started(init, failure: str, show: tuple[str, ...] | None):
    """Ray started by ``init`` (Ctrl-C held back until it has: :func:`interrupts_after`; a failure is ``failure``
    and Ray's first line), the output of only ``show``'s actors forwarded, then the block; Ray shut down after."""
    import ray

    outer = signal.getsignal(signal.SIGTERM) if _main_thread() else None  # (put back after: ray.init sets its own)
    _hold_sigterm()  # while Ray starts: its C++ handler printed a crash dump (status 134) and left its processes
    try:
        with interrupts_after() as interrupted:
            try:
                init()
            except SystemExit as e:  # SIGTERM while Ray started: its own handler's sys.exit(15) ended the
                if e.code != signal.SIGTERM:  # command without a word; it is the interrupt Ctrl-C is
                    raise
                ray.shutdown()
                raise KeyboardInterrupt from None
            except Exception as e:  # noqa: BLE001 - one sentence, not Ray's traceback
                raise RayClusterError(f"{failure} ({_first_line(e)})") from None
    except BaseException:
        _release_sigterm(outer)
        raise
    try:
        with terminate_as_interrupt():  # (installed after ray.init, which sets a handler of its own)
            _unblock_sigterm()  # one that came meanwhile is a KeyboardInterrupt here
            interrupted()
            if show is not None:
                _forward_only(show)
            yield
    finally:
        _hold_sigterm()  # (Ray's handler, or a C++ one, is still set while it stops)
        try:
            ray.shutdown()
        finally:
            _release_sigterm(outer)  # the handler from before Ray (not the one ray.init left)


_HELD = False  # SIGTERM blocked by _hold_sigterm


def _let_sigterm_in_child() -> None:
    """In a process forked while SIGTERM was held (Ray's daemons: they are started with a ``preexec_fn``, which
    runs this): let it in, as ``ray shutdown`` and a process group's ``kill`` stop them with it."""
    if _HELD:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


os.register_at_fork(after_in_child=_let_sigterm_in_child)


def _hold_sigterm() -> None:
    """Block SIGTERM in this (the main) thread, and the threads started meanwhile (a SIGTERM that another
    thread, OpenMP's, takes reaches Ray's handler: its ``sys.exit(15)`` is taken as Ctrl-C by :func:`_started`)."""
    global _HELD
    if _main_thread():
        _HELD = True
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def _unblock_sigterm() -> None:
    global _HELD
    if _main_thread():
        _HELD = False
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _release_sigterm(outer) -> None:
    """Put ``outer`` back as SIGTERM's handler, then let SIGTERM in (one held meanwhile reaches it now)."""
    if not _main_thread():
        return
    signal.signal(signal.SIGTERM, outer if outer is not None else signal.SIG_DFL)
    _unblock_sigterm()


@contextlib.contextmanager
def connect(address: str | None = None, *, show: tuple[str, ...] | None = None,
            object_store_memory: int = LOCAL_OBJECT_STORE, worker_env: Mapping[str, str] | None = None):
    """Ray for the duration of the ``with`` block: the cluster at ``address`` (None: ``$RAY_ADDRESS``), or an
    embedded local Ray (empty). Yields the address connected to (``"local"`` for the embedded one).

    ``show``: the actor class names whose output reaches this terminal (None: every worker's, Ray's default).
    ``worker_env``: variables set in the job's workers (with those :func:`forwarded_env` forwards to a cluster).
    """
    import ray

    if ray.is_initialized():  # someone else's Ray (a test, a notebook): use it, leave it running
        yield "existing"
        return
    address = given_address(address)
    quiet = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "1"}
    options = dict(include_dashboard=False, log_to_driver=True, configure_logging=False,
                   logging_level=logging.ERROR)
    if worker_env:
        options["runtime_env"] = {"env_vars": dict(worker_env)}
    if address is None:
        root = temp_root()
        prune_temp(root)
        folder = root / str(os.getpid())
        folder.mkdir(parents=True, exist_ok=True)
        try:
            if AUTH_MODE not in os.environ:  # Ray's default for a new local cluster, without its notice
                _enable_token_mode()
            with _env(**quiet):
                with _started(lambda: ray.init(address="local", _temp_dir=str(folder),
                                               object_store_memory=object_store_memory, **options),
                              "could not start a local Ray", show):
                    yield "local"
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return
    with _env(**quiet):
        check_given(address)
        forward = {**forwarded_env(os.environ), **(worker_env or {})}
        if forward:
            options["runtime_env"] = {"env_vars": forward}
        with _started(lambda: ray.init(address=address, **options),
                      f"could not connect to the Ray cluster at {address}", show):
            yield address
