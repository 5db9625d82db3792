"""The CLI as documented: CLI.md names every command and option that --help shows."""

from __future__ import annotations

import signal
import urllib.error
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli.main import cli

CLI_MD = (Path(__file__).resolve().parents[1] / "CLI.md").read_text()


def commands(group: click.Group, prefix: str = ""):
    for name, cmd in group.commands.items():
        path = f"{prefix}{name}"
        yield path, cmd
        if isinstance(cmd, click.Group):
            yield from commands(cmd, path + " ")


@pytest.mark.parametrize("path, cmd", list(commands(cli)), ids=lambda x: x if isinstance(x, str) else "")
def test_every_command_and_option_is_documented(path, cmd):
    assert f"pipeline {path}" in CLI_MD, f"CLI.md does not show `pipeline {path}`"
    for param in cmd.params:
        for opt in param.opts + param.secondary_opts:
            if opt.startswith("--"):
                assert opt in CLI_MD, f"CLI.md does not document {opt} of `pipeline {path}`"
    assert CliRunner().invoke(cli, [*path.split(), "--help"]).exit_code == 0


def test_the_group_lists_each_command_by_its_own_first_sentence_and_imports_none_to_do_so():
    """`pipeline --help` and `--version` answer without importing torch (a command's module, and so the model
    registries, load when the command is asked for); the sentence `pipeline --help` shows for each is its own."""
    import subprocess
    import sys

    from pipeline.cli.main import COMMANDS

    for name, (_, _, sentence) in COMMANDS.items():
        assert cli.commands[name].get_short_help_str(10_000) == sentence, name
    code = ("import sys; from pipeline.cli.main import main; sys.argv = ['pipeline', sys.argv[1]]\n"
            "try:\n    main()\nexcept SystemExit:\n    print('torch' in sys.modules, file=sys.stderr)")
    for flag in ("--help", "--version"):
        r = subprocess.run([sys.executable, "-c", code, flag], capture_output=True, text=True, check=True,
                           cwd=Path(__file__).resolve().parents[1])
        assert r.stderr == "False\n" and r.stdout, (flag, r.stdout, r.stderr)
    help_text = CliRunner().invoke(cli, ["--help"]).output
    assert all(f"  {name}  " in help_text for name in COMMANDS)


def example_command_lines(text: str):
    """Each ``pipeline …`` command line of a Markdown text's code blocks (continuation lines joined, trailing
    comments dropped; also after ``-m``, as under torchrun): (command path, its arguments, the line)."""
    import re
    import shlex

    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            try:
                tokens = shlex.split(line)
            except ValueError:
                continue
            for i, token in enumerate(tokens):
                if token == "pipeline" and (i == 0 or tokens[i - 1] in ("-m", "&&", ";")):
                    rest, cmd, path = tokens[i + 1:], cli, []
                    while isinstance(cmd, click.Group) and rest and rest[0] in cmd.commands:
                        cmd, path, rest = cmd.commands[rest[0]], [*path, rest[0]], rest[1:]
                    yield cmd, " ".join(path), rest, line


def test_every_example_command_line_in_the_docs_uses_options_its_command_has():
    """An example that a rename or a removed option left behind fails as soon as a user copies it."""
    root = Path(__file__).resolve().parents[1]
    seen, wrong = 0, []
    for doc in [root / "CLI.md", root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for cmd, path, args, line in example_command_lines(doc.read_text()):
            if isinstance(cmd, click.Group):
                continue
            seen += 1
            known = {o for p in cmd.params for o in p.opts + p.secondary_opts} | {"--help"}
            for arg in args:
                if arg in ("&&", ";", "|"):
                    break
                if arg.startswith("--") and arg.split("=", 1)[0] not in known:
                    wrong.append(f"{doc.name}: `pipeline {path}` has no {arg.split('=', 1)[0]}: {line}")
    assert seen > 50 and wrong == []


def test_weights_convert_writes_a_checkpoint_salgan_loads(tmp_path):
    from teachers import build_teacher
    from teachers.salgan import _conv_shapes

    rng = np.random.default_rng(0)
    arrays = {}
    for i, (_, shape) in enumerate(_conv_shapes()):
        arrays[f"arr_{2 * i}"] = rng.standard_normal(shape).astype(np.float32) * 0.01
        arrays[f"arr_{2 * i + 1}"] = np.zeros(shape[0], np.float32)
    np.savez(tmp_path / "gen_modelWeights0090.npz", **arrays)
    out = tmp_path / "salgan.pt"
    result = CliRunner().invoke(cli, ["weights", "convert", str(tmp_path / "gen_modelWeights0090.npz"), str(out)])
    assert result.exit_code == 0, result.output
    teacher = build_teacher("salgan", weights=str(out))
    assert teacher.weights_digest in result.output and not teacher.weights_random


def test_weights_fetch_offline_names_file_url_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    result = CliRunner().invoke(cli, ["weights", "fetch", "deepgaze2e"])
    assert result.exit_code == 1
    line = result.output.strip()
    assert line.startswith("Error:") and "\n" not in line
    assert "deepgaze2e.pth" in line and "https://" in line and str(tmp_path) in line


def test_a_warning_is_one_line_on_the_command_line(capsys, monkeypatch):
    """`pipeline …` prints every warning as one `warning:` line (no file:line, no source line)."""
    import warnings

    import pipeline.cli.main as main

    monkeypatch.setattr(main, "cli", lambda **kwargs: warnings.warn("teacher 'x' runs with RANDOM weights:\n  "
                                                                    "its labels are not meaningful", UserWarning))
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored after the test
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        main.main()
    err = capsys.readouterr().err
    assert err == "warning: teacher 'x' runs with RANDOM weights: its labels are not meaningful\n"


@pytest.mark.parametrize("args, option", [
    (["train", "--labels", "{missing}", "--run", "{tmp}/run"], "'--labels'"),
    (["train", "--labels", "{samples}", "--init", "{missing}", "--run", "{tmp}/run"], "'--init'"),
    (["label", "coco", "--teacher", "classic", "--coco-root", "{missing}", "--out", "{tmp}/o"], "'--coco-root'"),
    (["label", "folder", "--teacher", "classic", "--images", "{missing}", "--out", "{tmp}/o"], "'--images'"),
    (["verify", "{missing}"], "'LABELS_DIR'"),
    (["eval", "--teacher", "classic", "--fixations", "{missing}"], "'--fixations'"),
    (["predict", "--checkpoint", "{missing}", "--images", "{samples}", "--out", "{tmp}/o"], "'--checkpoint'"),
    (["fixations", "mit1003", "--root", "{missing}", "--out", "{tmp}/f.h5"], "'--root'"),
    (["run", "{missing}"], "'MANIFEST'"),
])
def test_a_path_named_on_the_command_line_that_does_not_exist_is_a_usage_mistake(tmp_path, args, option):
    """Exit status 2 and one `Error:` line naming the option and the path, whatever the command; nothing is
    written (CLI.md, "Errors")."""
    missing = tmp_path / "nowhere"
    fill = {"missing": missing, "tmp": tmp_path, "samples": Path(__file__).resolve().parents[1] / "samples"}
    r = CliRunner().invoke(cli, [a.format(**fill) for a in args])
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert r.exit_code == 2, r.output
    assert len(errors) == 1 and option in errors[0] and str(missing) in errors[0], r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a refused command wrote something"


@pytest.mark.parametrize("command", [["label", "coco", "--teacher", "classic", "--coco-root", "{samples}/coco"],
                                     ["train", "--labels", "{samples}"], ["eval", "--teacher", "classic"],
                                     ["predict", "--teacher", "classic", "--images", "{samples}", "--out", "{tmp}/o"],
                                     ["profile", "--student", "fastsal_a"]])
def test_a_mistyped_device_is_a_usage_mistake(tmp_path, command):
    """`--device gpu` was exit status 1 (found when the command resolved it), a bad option value elsewhere 2."""
    fill = {"tmp": tmp_path, "samples": Path(__file__).resolve().parents[1] / "samples"}
    r = CliRunner().invoke(cli, [*(a.format(**fill) for a in command), "--device", "gpu"])
    assert r.exit_code == 2 and r.output.splitlines()[-1] == (
        "Error: Invalid value for '--device': unknown device 'gpu': give auto, cpu, cuda or cuda:N"), r.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, option", [
    (["label", "coco", "--teacher", "classic", "--coco-root", "s3://b/coco", "--out", "o"], "'--coco-root'"),
    (["predict", "--teacher", "classic", "--images", "s3://b/imgs", "--out", "o"], "'--images'"),
    (["profile", "--student", "fastsal_a", "--calibration", "gs://b/labels/classic/val2017"], "'--calibration'"),
])
def test_a_url_where_a_local_path_is_read_is_one_sentence_saying_so(tmp_path, monkeypatch, args, option):
    """`s3://b/coco` became `s3:/b/coco does not exist`."""
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, args)
    url = next(a for a in args if "://" in a)
    assert r.exit_code == 2 and (f"Error: Invalid value for {option}: {url} is a URL; this option reads a local or "
                                 "shared-filesystem path only") in r.output, r.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, option", [
    (["train", "--labels", "{samples}", "--init", "{url}", "--run", "{tmp}/run"], "'--init'"),
    (["train", "--labels", "{url}", "--run", "{tmp}/run"], "'--labels'"),
    (["eval", "--teacher", "classic", "--fixations", "{url}"], "'--fixations'"),
    (["verify", "{url}"], "'LABELS_DIR'"),
    (["eval", "--checkpoint", "{url}", "--labels", "{samples}"], "'--checkpoint'"),
])
def test_an_http_url_where_a_path_or_object_storage_url_is_read_is_one_sentence_saying_so(tmp_path, args, option):
    """`--init http://host/x.pth` said the file did not exist while the server served it (fsspec's http
    filesystem, asked with the scheme cut off); nothing is fetched to say so (port 9: nothing listens)."""
    url = "http://127.0.0.1:9/runs/a/x.pth"
    fill = {"url": url, "tmp": tmp_path, "samples": Path(__file__).resolve().parents[1] / "samples"}
    r = CliRunner().invoke(cli, [a.format(**fill) for a in args])
    assert r.exit_code == 2 and r.output.splitlines()[-1] == (
        f"Error: Invalid value for {option}: {url} is an http(s) URL; this option takes a path or an object-storage "
        "URL (s3://, gs://…): download the file first and give its path"), r.output
    assert list(tmp_path.iterdir()) == []


def test_a_file_url_names_a_local_folder_where_only_local_paths_are_read(tmp_path):
    root = Path(__file__).resolve().parents[1]
    r = CliRunner().invoke(cli, ["predict", "--teacher", "classic", "--images", f"file://{root}/samples/coco/val2017",
                                 "--out", str(tmp_path / "maps"), "--no-progress"])
    assert r.exit_code == 0 and "maps written   12" in r.output, r.output


@pytest.mark.parametrize("args, option", [
    (["label", "coco", "--teacher", "classic", "--coco-root", "{samples}/coco", "--out", ""], "'--out'"),
    (["train", "--labels", "{samples}", "--run", " "], "'--run'"),
    (["run", "{demo}", "--workdir", "", "--dry-run"], "'--workdir'"),
    (["label", "folder", "--teacher", "classic", "--images", "", "--out", "o"], "'--images'"),
    (["predict", "--teacher", "classic", "--images", "", "--out", "o"], "'--images'"),
    (["verify", ""], "'LABELS_DIR'"),
])
def test_an_empty_path_is_refused_not_taken_for_the_current_directory(tmp_path, monkeypatch, args, option):
    """`--out "$OUT"` with OUT unset would otherwise write into the current directory."""
    monkeypatch.chdir(tmp_path)
    root = Path(__file__).resolve().parents[1]
    fill = {"samples": root / "samples", "demo": root / "manifests" / "demo.yaml"}
    r = CliRunner().invoke(cli, [a.format(**fill) for a in args])
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert r.exit_code == 2 and len(errors) == 1 and option in errors[0] and "empty path" in errors[0], r.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, out", [
    (["eval", "--teacher", "classic", "--labels", "{labels}"], "{blocked}/metrics.json"),
    (["predict", "--teacher", "classic", "--images", "{samples}/coco/val2017"], "{blocked}/maps/day1"),
    (["profile", "--student", "fastsal_a", "--iters", "1"], "{blocked}/profile.json"),
    (["export", "--student", "fastsal_a", "--weights", "random"], "{blocked}/fastsal_a.onnx"),
    (["fixations", "mit1003", "--root", "{samples}"], "{blocked}/mit1003.h5"),
])
def test_an_out_that_cannot_be_written_is_one_sentence_before_any_work(tmp_path, sample_labels, args, out):
    """`--out` under a file: the folder it needs cannot exist; said before the model is built or an image read.
    (A folder that is not writable is refused the same way: see the /proc test below.)"""
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    fill = {"labels": sample_labels, "samples": Path(__file__).resolve().parents[1] / "samples", "blocked": blocked}
    out = out.format(**fill)
    r = CliRunner().invoke(cli, [*(a.format(**fill) for a in args), "--out", out])
    assert r.exit_code == 1 and r.output.strip().splitlines() == [
        f"Error: cannot write --out {out}: {blocked} is a file, not a folder"], r.output
    assert blocked.read_text() == ""


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_out_in_a_folder_that_takes_no_files_is_refused_even_for_root(sample_labels):
    """/proc is a folder no one can create a file in, but `access()` tells root it may: the check creates an
    unnamed file there, so root (as the tests run here) is refused like anyone else, and nothing is scored."""
    out = "/proc/pipeline-nowhere/metrics.json"
    r = CliRunner().invoke(cli, ["eval", "--teacher", "classic", "--labels", str(sample_labels), "--out", out])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert r.output.startswith(f"Error: cannot write --out {out}: the folder /proc "), r.output


def test_ctrl_c_in_label_or_train_says_what_is_kept_and_exits_130(tmp_path, sample_labels, monkeypatch):
    """Not click's bare "Aborted!": what survives, and that the same command carries on (exit 128 + SIGINT)."""
    import pipeline.label.driver
    import pipeline.train.loop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.label.driver, "label", interrupted)
    monkeypatch.setattr(pipeline.train.loop, "train", interrupted)
    samples = Path(__file__).resolve().parents[1] / "samples" / "coco"
    for args, said in (
            (["label", "coco", "--teacher", "classic", "--coco-root", samples, "--out", tmp_path / "labels"],
             "interrupted: the finished shards are kept (each has its marker); run the same command again to label "
             "the rest"),
            (["label", "coco", "--teacher", "classic", "--coco-root", samples, "--out", tmp_path / "labels",
              "--overwrite"],  # (it said to run it again: that starts over)
             "interrupted: the finished shards are kept (each has its marker); the same command, with --overwrite, "
             "labels every shard again"),
            (["train", "--labels", sample_labels, "--run", tmp_path / "run"],
             "interrupted: the run resumes after its last finished epoch when the same command runs again"),
            (["train", "--labels", sample_labels, "--run", tmp_path / "run", "--restart"],  # (as it was, anew again)
             "interrupted: the run resumes after its last finished epoch when the same command without --restart "
             "runs again")):
        r = CliRunner().invoke(cli, [str(a) for a in args])
        assert r.exit_code == 130 and r.output.strip().splitlines() == [said], r.output


def test_an_existing_input_that_is_wrong_is_a_failure_not_a_usage_mistake(tmp_path):
    """Exit status 1: the command line was right, the work could not be done."""
    r = CliRunner().invoke(cli, ["train", "--labels", str(tmp_path), "--run", str(tmp_path / "run"),
                                 "--backbone-weights", "none", "--no-progress"])
    assert r.exit_code == 1 and r.output.startswith("Error: ") and "labels.json" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["coco", "--coco-root", "{samples}", "--images", "{samples}/val2017"],
     "--images is for source folder; source coco reads --coco-root's --split"),
    (["folder", "--images", "{samples}/val2017", "--split", "train2017"], "--split is for source coco"),
])
def test_an_option_of_the_other_label_source_is_refused_not_ignored(tmp_path, args, message):
    samples = Path(__file__).resolve().parents[1] / "samples" / "coco"
    r = CliRunner().invoke(cli, ["label", *[a.format(samples=samples) for a in args], "--teacher", "classic",
                                 "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and r.output.splitlines()[-1].startswith(f"Error: {message}"), r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (["--fixations", "{tmp}/f.h5", "--val-shards", "2"], "--val-shards goes with --labels"),
    (["--labels", "{tmp}", "--sigma", "0.05", "--baseline", "uniform"], "--baseline and --sigma go with --fixations"),
])
def test_eval_options_of_the_other_kind_of_scoring_are_refused_not_ignored(tmp_path, args, message):
    (tmp_path / "f.h5").touch()
    r = CliRunner().invoke(cli, ["eval", "--teacher", "classic", *[a.format(tmp=tmp_path) for a in args]])
    assert r.exit_code == 2 and r.output.splitlines()[-1].startswith(f"Error: {message}"), r.output


def test_ray_options_with_the_local_executor_are_warned_of_not_ignored_silently(tmp_path, monkeypatch):
    """`--executor local --gpus 4 --address host:1` labelled in-process without a word of either; $RAY_ADDRESS
    (not given on the command line) says nothing."""
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    samples = Path(__file__).resolve().parents[1] / "samples" / "coco"
    r = CliRunner().invoke(cli, ["label", "coco", "--coco-root", str(samples), "--teacher", "salgan", "--executor",
                                 "local", "--gpus", "4", "--address", "x:1", "--out", str(tmp_path / "o")])
    assert r.stderr.splitlines()[0] == ("warning: --address, --gpus are for --executor ray; --executor local labels "
                                        "in this process and ignores them"), r.stderr
    r = CliRunner().invoke(cli, ["label", "coco", "--coco-root", str(samples), "--teacher", "salgan", "--executor",
                                 "local", "--out", str(tmp_path / "o")])
    assert "warning" not in r.stderr and r.exit_code == 1, r.output  # (salgan without --weights: refused)


def test_a_teachers_missing_weights_are_asked_for_by_the_option_the_command_has(sample_labels, tmp_path):
    """train's teacher takes --teacher-weights, predict's comparison --compare-weights (the messages said
    --weights, which neither command has)."""
    samples = Path(__file__).resolve().parents[1] / "samples" / "coco" / "val2017"
    train = CliRunner().invoke(cli, ["train", "--labels", str(sample_labels), "--run", str(tmp_path / "r"),
                                     "--stage", "hint", "--student", "fastsal_c", "--teacher", "salgan",
                                     "--backbone-weights", "none"])
    assert train.exit_code == 1 and train.output.splitlines()[-1].startswith(
        "Error: salgan needs --teacher-weights: "), train.output
    assert "--teacher-weights random is for testing only" in train.output
    predict = CliRunner().invoke(cli, ["predict", "--teacher", "classic", "--images", str(samples), "--out",
                                       str(tmp_path / "p"), "--compare-teacher", "deepgaze2"])
    assert predict.exit_code == 1 and predict.output.splitlines()[-1] == (
        "Error: DeepGaze II has no public PyTorch checkpoint: pass --compare-weights PATH (a state dict in this "
        "layout) or use --compare-teacher deepgaze2e"), predict.output
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("command", [["label", "coco", "--coco-root", "samples/coco", "--split", "val2017",
                                      "--teacher", "classic"], ["train", "--ray-workers", "2"]])
def test_an_address_that_is_not_host_port_is_a_usage_mistake_and_ray_address_is_read_only_where_ray_is_used(
        tmp_path, monkeypatch, command):
    """`--address 10.0.0.5` (no port) is exit status 2 before any work; `auto` and `ray://` addresses, which Ray
    takes, are not; a RAY_ADDRESS that a command running no Ray would never use (`auto`, as some clusters set it)
    is not a reason to refuse that command."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    args = [*command, "--labels" if command[0] == "train" else "--out", str(tmp_path / "x")]
    result = CliRunner().invoke(cli, [*args, "--address", "10.0.0.5"])
    assert result.exit_code == 2, result.output
    assert ("Invalid value for '--address': '10.0.0.5' is not a Ray cluster address: give the head's host:port"
            in result.output)
    assert not (tmp_path / "x").exists()
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    local = CliRunner().invoke(cli, ["train", "--labels", str(tmp_path / "nothing"), "--ray-workers", "0"])
    assert local.exit_code == 2 and "--address" not in local.output and "nothing does not exist" in local.output
    for taken in ("auto", "ray://10.0.0.5:10001"):  # what Ray itself takes besides host:port: not refused here
        given = CliRunner().invoke(cli, ["train", "--labels", str(tmp_path / "nothing"), "--ray-workers", "2",
                                         "--address", taken])
        assert given.exit_code == 2 and "--address" not in given.output, given.output
        assert "nothing does not exist" in given.output


def test_label_warns_at_once_that_a_size_the_students_cannot_train_on_will_be_refused(tmp_path):
    """48x80 labels were made, then `train` refused them (sides must be multiples of 32): `label` says so up
    front, in one line, and labels anyway (a teacher's maps at any size are still labels)."""
    root = Path(__file__).resolve().parents[1] / "samples" / "coco"
    args = ["label", "coco", "--teacher", "classic", "--coco-root", str(root), "--split", "val2017", "--executor",
            "local", "--no-progress", "--shard-size", "100"]
    odd = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "a"), "--image-size", "48x80"])
    assert odd.exit_code == 0, odd.output
    assert odd.output.count("warning: --image-size 48x80: the students train on sizes whose sides are multiples "
                            "of 32") == 1
    fine = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "b"), "--image-size", "64x96"])
    assert fine.exit_code == 0 and "warning" not in fine.output, fine.output


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks")
def test_ctrl_c_while_a_command_imports_is_held_until_it_has_imported_then_is_exit_130(monkeypatch):
    """Ctrl-C or SIGTERM landing inside torch's import (a C++ callback) aborted the process now and then (exit
    134, a page of C++ frames): the command's import runs with both held, and one that came meanwhile is taken
    once it is done, as exit status 130."""
    import threading
    import types

    from pipeline.cli import main as cli_main

    held = []

    def import_module(name):
        # lands in the middle of the import: sent to this thread (a process-directed one would go to a thread that
        # does not hold it, of which pytest's process may have some from earlier tests; the command line's only
        # threads at this point are this one and those the import starts, which hold it too)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        held.append(signal.SIGINT in signal.sigpending())  # (not raised here)
        return types.SimpleNamespace(label_cmd="the command")

    monkeypatch.setattr(cli_main.importlib, "import_module", import_module)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # (an earlier test's Ray may have set its own)
    try:
        with pytest.raises(SystemExit) as e:
            cli_main._LazyCommands()["label"]
    finally:
        signal.signal(signal.SIGINT, before)
    assert e.value.code == 130 and held == [True] and signal.SIGINT not in signal.sigpending()
    monkeypatch.undo()
    assert cli_main._LazyCommands()["label"].name == "label"  # nothing pending, nothing held after
