"""The pipeline against a real Ray cluster: a head started with `ray start --head` as its own process on the
loopback address, token authentication on (Ray's default once a token exists), and a second head killed with
SIGKILL so that the machine has a recorded "current cluster" that is dead.

One module-scoped pair of heads serves every test here, and the commands run as concurrent subprocesses, so
that Ray's start-up waits overlap.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples" / "coco"
RAY = Path(sys.executable).with_name("ray")
LABEL = ["label", "coco", "--teacher", "classic", "--coco-root", str(SAMPLES), "--shard-size", "4",
         "--io-threads", "2", "--no-progress"]
TRAIN = ["train", "--ray-workers", "2", "--epochs", "1", "--batch-size", "2", "--backbone-weights", "none",
         "--workers", "0", "--shuffle-buffer", "0", "--no-progress"]

pytestmark = pytest.mark.skipif(not RAY.is_file(), reason="the `ray` command is not installed next to Python")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra: str) -> dict:
    """This test session's environment without any Ray address or auth mode (conftest disables auth for the
    in-process tests), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                                                              "RAY_AUTH_TOKEN_PATH", "RAY_TMPDIR")}
    return {**env, "RAY_USAGE_STATS_ENABLED": "0", **extra}


@dataclass
class Head:
    proc: subprocess.Popen
    address: str
    tmpdir: Path  # its RAY_TMPDIR: the recorded "current cluster" and the session folder
    token_file: Path
    log: Path

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()

    def ready(self) -> bool:
        return "Ray runtime started" in self.log.read_text(errors="replace")

    def kill(self, sig=signal.SIGKILL) -> None:
        """Signal the head and every process it started (one process group)."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass


def start_head() -> Head:
    """`ray start --head --block` in its own process group; its token in a file of its own
    (RAY_AUTH_TOKEN_PATH), which `ray start` finds and turns token authentication on for."""
    tmpdir = Path(tempfile.mkdtemp(prefix="ray-head-"))  # short: Ray's socket paths live under it
    token_file = tmpdir / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    port = free_port()
    log = tmpdir / "head.log"
    env = base_env(RAY_TMPDIR=str(tmpdir), RAY_AUTH_TOKEN_PATH=str(token_file))
    with open(log, "w") as out:
        proc = subprocess.Popen([str(RAY), "start", "--head", "--block", "--port", str(port), "--num-cpus", "2",
                                 "--node-ip-address", "127.0.0.1", "--include-dashboard", "false",
                                 "--object-store-memory", str(128 * 1024**2), "--disable-usage-stats"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return Head(proc, f"127.0.0.1:{port}", tmpdir, token_file, log)


def wait_ready(*heads: Head, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    for head in heads:
        while not head.ready():
            assert head.proc.poll() is None, f"ray start --head ended:\n{head.log.read_text()}"
            assert time.monotonic() < deadline, f"the head did not start:\n{head.log.read_text()}"
            time.sleep(0.2)


def stop(head: Head) -> None:
    """SIGKILL the head's whole process group (never `ray stop`, which stops every Ray on the machine)."""
    head.kill(signal.SIGKILL)
    head.proc.wait()
    shutil.rmtree(head.tmpdir, ignore_errors=True)


@pytest.fixture(scope="module")
def heads():
    """(live, dead): a running head, and one that was started and then SIGKILLed with all its processes."""
    live, dead = start_head(), start_head()
    try:
        wait_ready(live, dead)
        dead.kill()
        dead.proc.wait()
        assert (dead.tmpdir / "ray" / "ray_current_cluster").read_text().strip().endswith(dead.address.split(":")[1])
        yield live, dead
    finally:
        stop(dead)
        stop(live)


def pipeline(*args, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def finish(*procs: subprocess.Popen) -> list[tuple[int, str, str]]:
    outputs = [p.communicate(timeout=600) for p in procs]
    return [(p.returncode, *o) for p, o in zip(procs, outputs)]


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("shard-*.tar"))}


def final_model(run: Path) -> dict:
    import json

    import torch

    name = json.loads((run / "checkpoints" / "latest.json").read_text())["checkpoint"]
    return torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=False)["model"]


@pytest.fixture(scope="module")
def labels(tmp_path_factory) -> Path:
    """The samples labelled in this process (`--executor local`): the reference shards, and the trains' input."""
    from click.testing import CliRunner

    from pipeline.cli.main import cli

    out = tmp_path_factory.mktemp("labels")
    made = CliRunner().invoke(cli, [*LABEL, "--out", str(out), "--executor", "local"])
    assert made.exit_code == 0, made.output
    return out / "classic" / "val2017"


def test_label_and_train_on_a_cluster_give_what_local_runs_give(heads, labels, tmp_path):
    """`label --address` and `train --ray-workers 2 --address` on the live head write the same shards (sha256)
    and the same weights as local runs. The local Ray Train run starts its own Ray although this machine's
    recorded cluster is a dead head, prints no Ray notice and leaves no session folder behind."""
    live, dead = heads
    cluster_label = pipeline(*LABEL, "--out", tmp_path / "cluster", "--address", live.address,
                             env=base_env(RAY_AUTH_TOKEN_PATH=str(live.token_file)))
    local_train = pipeline(*TRAIN, "--labels", labels, "--run", tmp_path / "run-local",
                           env=base_env(RAY_TMPDIR=str(dead.tmpdir)))
    cluster_train = pipeline(*TRAIN, "--labels", labels, "--run", tmp_path / "run-cluster", "--address",
                             live.address, env=base_env(RAY_AUTH_TOKEN=live.token))
    (code, out, err), (tcode, tout, terr), (ccode, cout, cerr) = finish(cluster_label, local_train, cluster_train)
    assert code == 0, out + err
    assert tcode == 0, tout + terr
    assert ccode == 0, cout + cerr
    assert len(digests(labels)) == 3 and digests(tmp_path / "cluster" / "classic" / "val2017") == digests(labels)
    a, b = final_model(tmp_path / "run-local"), final_model(tmp_path / "run-cluster")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    for text in (err, terr, cerr):  # no token notice, GCS warnings, Ray Train controller chatter or tracebacks
        for noise in ("Token authentication", "gcs_client", "TrainController", "PlacementGroupCleaner",
                      "Traceback", "Error"):
            assert noise not in text, text
    # the embedded Ray's session folder is gone; the dead head's own session is all that is left there
    assert list((dead.tmpdir / f"pipeline-ray-{os.getuid()}").iterdir()) == []
    assert len(list((dead.tmpdir / "ray").glob("session_2*"))) == 1


def test_cluster_failures_are_one_sentence(heads, labels, tmp_path):
    """A wrong address (the dead head's), a missing token, a wrong token: one `Error:` line each, naming the
    address and what to set, and none of Ray's retries or warnings."""
    live, dead = heads
    nothing = tmp_path / "home"  # no ~/.ray/auth_token there
    nothing.mkdir()
    wrong_address = pipeline(*LABEL, "--out", tmp_path / "a", "--address", dead.address, env=base_env())
    no_token = pipeline(*LABEL, "--out", tmp_path / "b", "--address", live.address, env=base_env(HOME=str(nothing)))
    wrong_token = pipeline(*TRAIN, "--labels", labels, "--run", tmp_path / "run", "--address", live.address,
                           env=base_env(RAY_AUTH_TOKEN="not-the-token"))
    results = finish(wrong_address, no_token, wrong_token)
    for code, out, err in results:
        assert code == 1 and out == "" and len(err.splitlines()) == 1 and err.startswith("Error: "), err
    (_, _, refused), (_, _, missing), (_, _, wrong) = results
    assert f"no Ray cluster answers at {dead.address} (connection refused)" in refused
    assert "RAY_ADDRESS" in refused
    assert f"the Ray cluster at {live.address} requires token authentication and no token was found" in missing
    assert "set RAY_AUTH_TOKEN" in missing and "RAY_AUTH_TOKEN_PATH" in missing
    assert f"the Ray cluster at {live.address} refused the authentication token from RAY_AUTH_TOKEN" in wrong
