"""The pipeline against a real Ray cluster: one head started with `ray start --head` as its own process on the
loopback address for the session, token authentication on (RAY_AUTH_MODE=token); the test SIGKILLs
it half-way, so that the machine has a recorded "current cluster" that is dead.

The commands run as concurrent subprocesses, so that Ray's start-up waits overlap. The head's environment has
no object-storage credentials: a cluster run that writes to S3 (moto's server) does so with the ones the command
forwards to its workers.
"""

from __future__ import annotations

import csv
import hashlib
import json
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

from pipeline.common.ray_cluster import forwarded_env

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples" / "coco"
RAY = Path(sys.executable).with_name("ray")
LABEL = ["label", "coco", "--teacher", "classic", "--coco-root", str(SAMPLES), "--shard-size", "4",
         "--io-threads", "2", "--image-size", "64x96", "--no-progress"]
FIT = ["--epochs", "2", "--batch-size", "2", "--backbone-weights", "none", "--workers", "0", "--shuffle-buffer", "0",
       "--no-progress"]
TRAIN = ["train", "--ray-workers", "2", *FIT]

needs_ray = pytest.mark.skipif(not RAY.is_file(), reason="the `ray` command is not installed next to Python")


def test_only_the_object_storage_variables_reach_the_clusters_workers():
    environ = {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_ENDPOINT_URL": "http://s3",
               "AWS_SESSION_TOKEN": "t", "GOOGLE_APPLICATION_CREDENTIALS": "/keys/sa.json", "FSSPEC_S3_ANON": "0",
               "AZURE_STORAGE_ACCOUNT_KEY": "k", "RAY_AUTH_TOKEN": "ray-secret", "RAY_ADDRESS": "head:6379",
               "PATH": "/bin", "HOME": "/home/me", "MY_AWS_THING": "x", "GOOGLE_OTHER": "y"}
    assert forwarded_env(environ) == {
        "AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_ENDPOINT_URL": "http://s3",
        "AWS_SESSION_TOKEN": "t", "GOOGLE_APPLICATION_CREDENTIALS": "/keys/sa.json", "FSSPEC_S3_ANON": "0",
        "AZURE_STORAGE_ACCOUNT_KEY": "k"}


def test_train_on_a_cluster_that_does_not_answer_says_so_before_checking_the_shards(sample_labels, tmp_path):
    """`train --ray-workers --address` with a wrong address checked every shard's sha256 first (minutes on COCO)
    and built the model before it found out: the cluster is asked first (a corrupt shard is not reached)."""
    from click.testing import CliRunner

    from pipeline.cli.main import cli

    labels = tmp_path / "labels"
    shutil.copytree(sample_labels, labels)
    tar = labels / "shard-000001.tar"
    tar.write_bytes(tar.read_bytes()[:-1] + b"x")
    port = free_port()
    r = CliRunner().invoke(cli, [*TRAIN, "--labels", str(labels), "--run", str(tmp_path / "run"), "--address",
                                 f"127.0.0.1:{port}"])
    assert r.exit_code == 1 and r.output.startswith(f"Error: no Ray cluster answers at 127.0.0.1:{port} "), r.output
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_ctrl_c_while_ray_starts_is_raised_once_it_has_started():
    """Interrupted inside `ray.init`, Ray 2.60 was left half-connected and the interpreter died at exit of a
    segmentation fault (1 run in 3 with Ctrl-C about 5 s into `pipeline label`). `connect` holds SIGINT back
    while Ray starts and raises it where `ray.shutdown` follows."""
    from pipeline.common.ray_cluster import interrupts_after

    outer = signal.getsignal(signal.SIGINT)  # (an earlier test's Ray may have set one of its own)
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, as `pipeline` has it
        with interrupts_after() as interrupted:
            os.kill(os.getpid(), signal.SIGINT)  # delivered to this (the main) thread's handler at once
            time.sleep(0.05)  # ...and nothing is raised here
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with pytest.raises(KeyboardInterrupt):
            interrupted()
        with interrupts_after() as interrupted:
            pass
        interrupted()  # no Ctrl-C, nothing to raise
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a background job: ignored, and left so
        with interrupts_after() as interrupted:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        interrupted()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, outer)


def test_sigterm_while_ray_runs_is_the_interrupt_ctrl_c_is():
    """`kill PID` (Slurm, Kubernetes, `timeout`) of `pipeline label` on Ray printed Ray's C++ crash dump and left
    its session folder; inside `connect` it is a KeyboardInterrupt, and the handler before is put back after."""
    from pipeline.common.ray_cluster import terminate_as_interrupt

    outer = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with terminate_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # (the handler runs at once, in this thread)
    assert signal.getsignal(signal.SIGTERM) == outer


def test_sigterm_while_ray_starts_is_held_and_is_the_interrupt_ctrl_c_is_once_it_has_started():
    """`kill PID` while `ray.init` ran reached Ray's handler, whose `sys.exit(15)` ended the command without a word:
    it is taken as Ctrl-C. After Ray, the handler from before Ray is back, not the one `ray.init` set, and SIGTERM
    (held back while Ray stops) is let in again."""
    from pipeline.common.ray_cluster import _started

    def interrupt(signum, frame):  # as `pipeline`'s main() has it
        raise KeyboardInterrupt

    def rays(signum, frame):  # what ray.init installs
        raise SystemExit(15)

    outer = signal.signal(signal.SIGTERM, interrupt)
    try:
        def init():
            signal.signal(signal.SIGTERM, rays)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # (Python runs its handler between two bytecodes of the main thread)

        with pytest.raises(KeyboardInterrupt):
            with _started(init, "could not start a local Ray", None):
                pytest.fail("the block ran")
        assert signal.getsignal(signal.SIGTERM) is interrupt
        assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    finally:
        signal.signal(signal.SIGTERM, outer)


@needs_ray
def test_rays_processes_started_while_sigterm_is_held_still_take_it():
    """SIGTERM is held back in the main thread while Ray starts; Ray's daemons, started meanwhile, inherited the
    mask and ignored SIGTERM (its shutdown fell back to killing them, a process group's `kill` missed them)."""
    import re

    import ray

    from pipeline.common.ray_cluster import connect

    def status(pid) -> str:
        try:
            return Path(f"/proc/{pid}/status").read_text()
        except OSError:  # (gone meanwhile)
            return ""

    assert not ray.is_initialized()
    with connect(None) as where:
        assert where == "local"
        parents = {int(p.name): int(m.group(1)) for p in Path("/proc").iterdir() if p.name.isdigit()
                   and (m := re.search(r"PPid:\s*(\d+)", status(p.name)))}
        ours, grew = {os.getpid()}, True
        while grew:  # every process below this one
            below = {pid for pid, parent in parents.items() if parent in ours}
            grew, ours = not below <= ours, ours | below
        masks = {pid: int(m.group(1), 16) for pid in ours - {os.getpid()}
                 if (m := re.search(r"SigBlk:\s*([0-9a-f]+)", status(pid)))}
    assert masks and not [pid for pid, mask in masks.items() if mask & 1 << (signal.SIGTERM - 1)], masks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra: str) -> dict:
    """This test session's environment without any Ray address or auth mode (conftest disables auth for the
    in-process tests) and without object-storage variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                                                              "RAY_AUTH_TOKEN_PATH", "RAY_TMPDIR")
           and k not in forwarded_env(os.environ)}
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
    """`ray start --head --block` in its own process group, with token authentication as Ray documents it
    (RAY_AUTH_MODE=token, from Ray 2.52; newer Rays turn it on by themselves) and its token in a file of its
    own (RAY_AUTH_TOKEN_PATH)."""
    tmpdir = Path(tempfile.mkdtemp(prefix="ray-head-"))  # short: Ray's socket paths live under it
    token_file = tmpdir / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    port = free_port()
    log = tmpdir / "head.log"
    env = base_env(RAY_TMPDIR=str(tmpdir), RAY_AUTH_TOKEN_PATH=str(token_file), RAY_AUTH_MODE="token")
    with open(log, "w") as out:
        proc = subprocess.Popen([str(RAY), "start", "--head", "--block", "--port", str(port), "--num-cpus", "4",
                                 "--node-ip-address", "127.0.0.1", "--include-dashboard", "false",
                                 "--object-store-memory", str(128 * 1024**2), "--disable-usage-stats"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return Head(proc, f"127.0.0.1:{port}", tmpdir, token_file, log)


def wait_ready(head: Head, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not head.ready():
        assert head.proc.poll() is None, f"ray start --head ended:\n{head.log.read_text()}"
        assert time.monotonic() < deadline, f"the head did not start:\n{head.log.read_text()}"
        time.sleep(0.2)


def stop(head: Head) -> None:
    """SIGKILL the head's whole process group (never `ray stop`, which stops every Ray on the machine)."""
    head.kill(signal.SIGKILL)
    head.proc.wait()
    shutil.rmtree(head.tmpdir, ignore_errors=True)


@pytest.fixture(scope="session")
def head():
    """The session's head (the test kills it with SIGKILL, with all its processes, half-way)."""
    if not RAY.is_file():
        pytest.skip("the `ray` command is not installed next to Python")
    live = start_head()
    try:
        wait_ready(live)
        yield live
    finally:
        stop(live)


def pipeline(*args, env: dict, launcher=("-m",)) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *launcher, "pipeline", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


#: PyTorch's own launcher, 2 processes on this machine (--run is its --run-path: train's --run-dir)
TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m")


def finish(*procs: subprocess.Popen) -> list[tuple[int, str, str]]:
    outputs = [p.communicate(timeout=600) for p in procs]
    return [(p.returncode, *o) for p, o in zip(procs, outputs)]


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("shard-*.tar"))}


def final_model(read) -> dict:
    """The model of the checkpoint a run folder's latest.json names (``read``: relative path → bytes)."""
    import io

    import torch

    name = json.loads(read("checkpoints/latest.json"))["checkpoint"]
    return torch.load(io.BytesIO(read(f"checkpoints/{name}")), map_location="cpu", weights_only=False)["model"]


@pytest.fixture(scope="module")
def labels(sample_labels) -> Path:
    """The samples labelled in this process (conftest's, with the options of LABEL and `--executor local`): the
    reference shards, and the trains' input."""
    return sample_labels


@needs_ray
def test_a_cluster_labels_and_trains_as_local_runs_do_and_its_killed_head_leaves_them_alone(
        head, labels, s3_server, tmp_path):
    """`label --address` writes to S3 the shards a local run writes (sha256) and `train --ray-workers 2 --address`
    (TorchTrainer, 2 CPU workers, Gloo) puts in an S3 run folder the weights that the same loop gets on 2 local
    processes under torchrun, with credentials only the command had; a missing or a wrong token is one `Error:`
    line. The torchrun run is data parallel: each process reads its own shards, both take as many steps as the
    one with the fewest full batches, and process 0 writes the usual run folder and alone prints the summary.
    (Ray Train's start-up is the slow part of this test: a local Ray Train run as the reference took 29 CPU
    seconds to the torchrun run's 11.) Then the head is SIGKILLed: its address is one `Error:` line,
    and a local Ray run after it (`label`, the cheapest) starts its own Ray although this machine's recorded
    cluster is that dead head, prints no Ray notice, labels as before and leaves no session folder behind.
    (One head for all of it, and the commands of each phase at once, so that Ray's start-up waits overlap.)"""
    import s3fs

    assert head.proc.poll() is None, "the head was killed by a test before this one"
    nothing = tmp_path / "home"  # no ~/.ray/auth_token there
    nothing.mkdir()
    cluster_label = pipeline(*LABEL, "--out", "s3://labels/cluster", "--address", head.address,
                             env=base_env(RAY_AUTH_TOKEN_PATH=str(head.token_file), **s3_server))
    cluster_train = pipeline(*TRAIN, "--labels", labels, "--run", "s3://labels/cluster-run", "--address",
                             head.address, env=base_env(RAY_AUTH_TOKEN=head.token, **s3_server))
    local_train = pipeline("train", *FIT, "--labels", labels, "--run-dir", tmp_path / "run-local", env=base_env(),
                           launcher=TORCHRUN)
    no_token = pipeline(*LABEL, "--out", tmp_path / "b", "--address", head.address, env=base_env(HOME=str(nothing)))
    wrong_token = pipeline(*TRAIN, "--labels", labels, "--run", tmp_path / "run", "--address", head.address,
                           env=base_env(RAY_AUTH_TOKEN="not-the-token"))
    (code, out, err), (ccode, cout, cerr), (tcode, tout, terr), *refused = finish(
        cluster_label, cluster_train, local_train, no_token, wrong_token)
    assert code == 0, out + err
    assert ccode == 0, cout + cerr
    assert tcode == 0, tout + terr
    local_run = tmp_path / "run-local"  # 12 photos in shards of 4: 2 for training, one per worker, 4 images each
    assert [line.split(",")[:3] for line in (local_run / "losses.csv").read_text().splitlines()] == [
        ["epoch", "step", "global_step"], ["0", "0", "1"], ["0", "1", "2"], ["1", "0", "3"], ["1", "1", "4"]]
    assert [line.split(",")[8] for line in (local_run / "metrics.csv").read_text().splitlines()] == [
        "images", "8", "8"]  # both workers' images, in each of the 2 epochs
    assert json.loads((local_run / "checkpoints" / "latest.json").read_text())["epoch"] == 1
    assert tout.count("img/s") == 1 and (local_run / "curves.png").is_file()  # process 0's summary alone
    columns = next(line.split() for line in tout.splitlines() if "train_loss" in line)
    rates = [float(line.split()[-1]) for line in tout.splitlines()
             if len(line.split()) == len(columns) and line.split()[0].isdigit()]
    both = [int(row[8]) / float(row[7]) for row in csv.reader((local_run / "metrics.csv").open()) if row[0].isdigit()]
    assert rates == pytest.approx(both, rel=0.02)  # both workers' images/s, as metrics.csv says (was process 0's)
    for text in (terr, cerr):  # worker 0's lines once (Ray Train's print patch would echo each twice)
        assert text.count("backbone: none") == 1, text

    head.kill()  # SIGKILL, every process of the head
    head.proc.wait()
    assert (head.tmpdir / "ray" / "ray_current_cluster").read_text().strip().endswith(head.address.split(":")[1])
    local_label = pipeline(*LABEL, "--out", tmp_path / "local", env=base_env(RAY_TMPDIR=str(head.tmpdir)))
    dead_address = pipeline(*LABEL, "--out", tmp_path / "a", "--address", head.address, env=base_env())
    (lcode, lout, lerr), *dead = finish(local_label, dead_address)
    assert lcode == 0, lout + lerr
    assert digests(tmp_path / "local" / "classic" / "val2017") == digests(labels)

    for rcode, rout, rerr in [*refused, *dead]:  # one sentence each, none of Ray's retries or warnings
        assert rcode == 1 and rout == "" and len(rerr.splitlines()) == 1 and rerr.startswith("Error: "), rerr
    (_, _, missing), (_, _, wrong), (_, _, gone) = [*refused, *dead]
    assert f"the Ray cluster at {head.address} requires token authentication and no token was found" in missing
    assert "set RAY_AUTH_TOKEN" in missing and "RAY_AUTH_TOKEN_PATH" in missing
    assert f"the Ray cluster at {head.address} refused the authentication token from RAY_AUTH_TOKEN" in wrong
    assert f"no Ray cluster answers at {head.address} (connection refused)" in gone and "RAY_ADDRESS" in gone

    fs = s3fs.S3FileSystem(endpoint_url=s3_server["AWS_ENDPOINT_URL"], key="test", secret="test",
                           skip_instance_cache=True)
    shards = {p.rsplit("/", 1)[1]: hashlib.sha256(fs.cat_file(p)).hexdigest()
              for p in fs.glob("labels/cluster/classic/val2017/shard-*.tar")}
    assert len(digests(labels)) == 3 and shards == digests(labels)
    a = final_model(lambda rel: (tmp_path / "run-local" / rel).read_bytes())
    b = final_model(lambda rel: fs.cat_file(f"labels/cluster-run/{rel}"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    for text in (err, terr, cerr, lerr):  # no token notice, GCS warnings, Ray Train controller chatter or tracebacks
        # (the raylet's own lines are forwarded by design, a worker killed for memory among them; on a loaded
        # machine its metrics agent's start-up may time out, which it says with "RpcError")
        text = "\n".join(line for line in text.splitlines() if "(raylet)" not in line)
        for noise in ("Token authentication", "gcs_client", "TrainController", "PlacementGroupCleaner",
                      "Traceback", "Error", "Found credentials"):
            assert noise not in text, text
    # the embedded Ray's session folder is gone; the dead head's own session is all that is left there
    assert list((head.tmpdir / f"pipeline-ray-{os.getuid()}").iterdir()) == []
    assert len(list((head.tmpdir / "ray").glob("session_2*"))) == 1
