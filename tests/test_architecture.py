"""The import graph is a clean tower: no module imports one that (transitively) imports it back, models never
import the pipeline, and each stage of ``pipeline/`` imports only the stages below it (read with ``ast``)."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "teachers", "students")
#: pipeline's stages, lowest first: a stage may import those before it, never those after
STAGES = ("common", "label", "train", "score", "manifest", "cli")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Modules of this project that ``name`` imports (function-local imports included)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    # a package's __init__ re-exporting its own children is not a dependency on them
    return {t for t in found if not t.startswith(name + ".")}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_a_checker_finds_a_cycle():
    with pytest.raises(graphlib.CycleError):
        graphlib.TopologicalSorter({"a": {"b"}, "b": {"a"}}).prepare()


def test_no_module_imports_one_that_imports_it_back():
    edges = graph()
    assert len(edges) > 40  # the walk found the project
    try:
        graphlib.TopologicalSorter(edges).prepare()
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")


def test_models_never_import_the_pipeline():
    bad = [f"{m} -> {t}" for m, ts in graph().items() if m.split(".")[0] in ("teachers", "students")
           for t in ts if t.split(".")[0] == "pipeline"]
    assert not bad
    bad = [f"{m} -> {t}" for m, ts in graph().items() if m.startswith("teachers") for t in ts
           if t.startswith("students")]
    assert not bad


def test_each_stage_imports_only_stages_below_it():
    def stage(module: str) -> int | None:
        parts = module.split(".")
        return STAGES.index(parts[1]) if parts[0] == "pipeline" and len(parts) > 1 and parts[1] in STAGES else None

    bad = [f"{m} -> {t}" for m, ts in graph().items() for t in ts
           if stage(m) is not None and stage(t) is not None and stage(t) > stage(m)]
    assert not bad, bad
    subpackages = {p.parent.name for p in (ROOT / "pipeline").glob("*/__init__.py")}
    assert subpackages == set(STAGES)  # every subpackage has its place in the tower


def test_the_cli_starts_without_importing_torchvision():
    """Every `pipeline` command loads the CLI, which lists the teachers and students; torchvision (a second
    to import, most of it torch._dynamo) is imported where a network is built, not to list them."""
    import subprocess
    import sys

    code = ("import sys, pipeline.cli.main, teachers, students; teachers.available(); students.available(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchvision'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_ctrl_c_while_the_command_line_imports_is_exit_130_without_a_traceback(monkeypatch, capsys):
    """The entry point (`pipeline`, `python -m pipeline`) imports the command line itself: Ctrl-C during that
    import (torch's second or two) gave a 30-line KeyboardInterrupt traceback."""
    import sys
    import types

    from pipeline.cli import start

    class Importing(types.ModuleType):
        def __getattr__(self, name):
            raise KeyboardInterrupt  # as if Ctrl-C came while the module was being imported

    monkeypatch.setitem(sys.modules, "pipeline.cli.main", Importing("pipeline.cli.main"))
    with pytest.raises(SystemExit) as e:
        start.main()
    assert e.value.code == 130 and capsys.readouterr().err == ""
    assert "pipeline.cli.start:main" in (ROOT / "pyproject.toml").read_text()
    assert (ROOT / "pipeline" / "__main__.py").read_text().startswith("from pipeline.cli.start import main")


def test_ctrl_c_while_a_command_imports_is_exit_130_without_a_word(monkeypatch):
    """The group imports a command's module when the command is asked for (inside click, which called Ctrl-C
    there "Aborted!", exit status 1): as at start-up, 130 and nothing said."""
    import sys
    import types

    from click.testing import CliRunner

    from pipeline.cli.main import cli

    class Importing(types.ModuleType):
        def __getattr__(self, name):
            raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "pipeline.cli.verify", Importing("pipeline.cli.verify"))
    r = CliRunner().invoke(cli, ["verify", "x"])
    assert r.exit_code == 130 and r.output == "", r.output
