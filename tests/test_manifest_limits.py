"""A manifest is read only when its size, nesting and expanded size (aliases counted as what they stand for)
are within limits: an alias bomb or a deep nest is one error line, before anything is built."""

from __future__ import annotations

import pytest

from pipeline.cli.main import cli
from pipeline.manifest.format import MAX_NODES, ManifestError, load_manifest


def bomb(levels: int) -> str:
    text = 'a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for i in range(1, levels + 1):
        text += f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n"
    return text + f"steps:\n  x: {{run: label, with: {{teacher: *a{levels}}}}}\n"


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb(8))  # 9**9 strings once expanded: gigabytes
    with pytest.raises(ManifestError, match=f"expands to more than {MAX_NODES:,} values"):
        load_manifest(path, group=cli)


def test_deep_nesting_and_huge_files_are_refused(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("steps: " + "[" * 100 + "]" * 100 + "\n")
    with pytest.raises(ManifestError, match="nests deeper than 64 levels"):
        load_manifest(deep, group=cli)
    huge = tmp_path / "huge.yaml"
    huge.write_text("# " + "x" * (2 << 20) + "\nsteps: {}\n")
    with pytest.raises(ManifestError, match="larger than 1 MiB"):
        load_manifest(huge, group=cli)


def test_a_few_aliases_are_still_fine(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("vars:\n  teacher: &t classic\n  again: *t\n"
                    "steps:\n  x: {run: label, with: {source: coco, teacher: *t}}\n")
    assert list(load_manifest(path, group=cli).steps) == ["x"]


def test_a_value_that_contains_itself_is_one_error_line(tmp_path):
    """An alias inside the value its anchor names (`x: &a [*a]`) would recurse without end."""
    path = tmp_path / "self.yaml"
    path.write_text("vars:\n  x: &a [1, *a]\nsteps:\n  a: {run: teachers}\n")
    with pytest.raises(ManifestError, match=r"self.yaml:2: the alias \*a stands inside the value its anchor &a names"):
        load_manifest(path, group=cli)


@pytest.mark.parametrize("state", ['{"version": 1, "steps": {"label": "done"}}', '{"steps": []}', "[]",
                                   '{"steps": {"a": {"settings": "x"}}}', '{"steps": {"a": {"inputs": []}}}'])
def test_a_state_file_out_of_shape_is_one_sentence(tmp_path, state):
    from pipeline.manifest.runner import RunnerError, load_state

    (tmp_path / ".pipeline").mkdir()
    (tmp_path / ".pipeline" / "state.json").write_text(state)
    with pytest.raises(RunnerError, match="is not a state file of `pipeline run`; delete it to start over"):
        load_state(tmp_path)
