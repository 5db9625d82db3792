"""Manifests: parse, validate and resolve a YAML declaration of pipeline steps (format: docs/manifest.md).

Everything is checked before any work starts, and every problem found is reported, each as one
line ``<manifest>:<line>: <message>``. A step's options are validated by click itself: the
command line is built from ``with:`` and parsed by the command (``make_context``), so types,
ranges, choices and required options give click's own messages.

Paths in a manifest (``workdir``, vars, options, ``inputs``) are used as written: a relative
path is relative to the current directory of ``pipeline run``, not to the manifest's folder.

A step's own fingerprint (:attr:`Step.own_fingerprint`) is the sha256 of: its command, its validated
settings (every parameter of the command with defaults filled in, less the command's volatile options and
options added later while they keep the earlier behaviour, see :mod:`pipeline.manifest.steps`; a path under
the workdir as ``${workdir}/…``, :func:`portable`, so that the workdir may be named otherwise or moved), the digest
of each declared input (:func:`input_digest`), and the code version (:func:`code_version`: a digest of the source files the
step's command runs). Its fingerprint adds the digests of what the steps it needs produced, as the state
file records them, so it is made by :func:`pipeline.manifest.plan.fingerprint_of` from the state, not here.

:func:`load_manifest` goes in four steps: parse the YAML (keeping line numbers), substitute the vars,
check each step's declaration, then resolve each step against its command.
"""

from __future__ import annotations

import difflib
import graphlib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import click
import yaml

import pipeline
from pipeline import __version__
from pipeline.common.storage import RemotePath, StorageError, as_path, file_path, is_url, local_place
from pipeline.manifest.steps import COMMANDS

TOP_KEYS = ("workdir", "vars", "steps")
STEP_KEYS = ("run", "with", "needs", "inputs", "resources")
RESOURCE_KEYS = ("cpus", "gpus")
RUNNER_COMMANDS = frozenset({"run", "status"})  # the runner's own commands cannot be steps
NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")
REF_RE = re.compile(r"\$\$|\$\{([^}]*)\}|\$\{")  # the last: a `${` never closed (an error)
WHOLE_REF_RE = re.compile(r"\$\{([^}]*)\}\Z")
STEP_REF_RE = re.compile(r"steps\.([^.]*)\.(.*)\Z")
#: vars every manifest has (and may not declare): the workdir, and where `pipeline weights fetch` caches weights
RESERVED_VARS = ("workdir", "weights_cache")
#: the packages whose source a step's command runs, and the parts of them it never runs (the runner itself)
CODE_PACKAGES = ("pipeline", "students", "teachers")
RUNNER_SOURCES = ("pipeline/manifest/", "pipeline/cli/run.py")


def source_digest(root: Path | None = None) -> str:
    """sha256 of the source files (``*.py``, by path) of :data:`CODE_PACKAGES` under ``root`` (this checkout
    or installation), less the manifest runner's own (:data:`RUNNER_SOURCES`)."""
    root = Path(root) if root is not None else Path(pipeline.__file__).resolve().parent.parent
    h = hashlib.sha256()
    for package in CODE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel.startswith(RUNNER_SOURCES) or "__pycache__" in rel:
                continue
            h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def code_version() -> str:
    """``pipeline <__version__>+<12 hex digits of source_digest()>``: changes with any source file a step runs."""
    global CODE_VERSION
    if CODE_VERSION is None:
        CODE_VERSION = f"pipeline {__version__}+{source_digest()[:12]}"
    return CODE_VERSION


CODE_VERSION: str | None = None


#: a URL (``s3://…``; ``s3:/…`` once a path option has normalised it), not a local path (an ``http(s)://`` one,
#: weights to download, is not refused)
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")
URL_STEP = ("step {!r}: {} is a URL: `pipeline {}` reads {} from a local or shared-filesystem path only (URLs are "
            "taken by {})")


def _url(text: str) -> str:
    """A URL as written (``s3://…``), also after a path option has normalised it to ``s3:/…``."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]+):/(?!/)", r"\1://", text)


class ManifestError(click.ClickException):
    """The manifest is invalid; ``errors`` holds one ``file:line: message`` line per problem."""

    exit_code = 2

    def __init__(self, errors: list[str]):
        errors = sorted(errors, key=lambda e: int(m.group(1)) if (m := re.match(r"[^\n]*?:(\d+): ", e)) else 0)
        super().__init__("\n".join(errors))
        self.errors = errors

    def show(self, file=None) -> None:
        for line in self.errors:
            click.echo(f"Error: {line}", err=True, file=file)


@dataclass(frozen=True)
class Resources:
    cpus: int = 1
    gpus: int = 0


@dataclass(frozen=True)
class Step:
    name: str
    command: str
    args: tuple[str, ...]  # the command line after `pipeline <command>`
    settings: Mapping[str, object]  # validated parameters that change the outputs (JSON values)
    needs: tuple[str, ...]  # declared `needs` plus steps named by ${steps.NAME.out}
    inputs: Mapping[str, str | None]  # declared external input -> digest (None: missing)
    resources: Resources
    output: str | None  # the step's output folder (None: the command has no entry in pipeline.manifest.steps)
    own_fingerprint: str  # command, settings, inputs, code version: all but what its upstream steps produced
    code_version: str
    line: int  # where the step is declared
    #: (option flag, local path) that must exist when the step starts and that no upstream step makes
    paths: tuple[tuple[str, str], ...] = ()
    #: the settings and the inputs as the state file records them: a path under the workdir as ``${workdir}/…``
    #: (:func:`portable`)
    recorded_settings: Mapping[str, object] = None
    recorded_inputs: Mapping[str, str | None] = None


@dataclass(frozen=True)
class Manifest:
    path: Path
    workdir: Path | RemotePath  # a local folder, or a folder on object storage (an fsspec URL)
    vars: Mapping[str, object]
    steps: Mapping[str, Step]  # in dependency order (declaration order where free)

    @property
    def state_dir(self) -> Path:
        return self.workdir / ".pipeline"

    def portable(self, settings: Mapping, keys: bool = False) -> dict:
        """``settings`` (a step's, or a state record's) with paths under this workdir as ``${workdir}/…``
        (``keys``: the keys, as of a step's inputs, not the values)."""
        return portable(settings, self.workdir, keys=keys)

    def upstream(self, names: Iterable[str]) -> set[str]:
        """Every step that ``names`` need, directly or not (``names`` excluded unless needed)."""
        seen: set[str] = set()
        todo = [n for name in names for n in self.steps[name].needs]
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo.extend(self.steps[name].needs)
        return seen

    def downstream(self, names: Iterable[str]) -> set[str]:
        """Every step that needs one of ``names``, directly or not (``names`` excluded unless needed)."""
        names = set(names)
        found: set[str] = set()
        for name, step in self.steps.items():  # dependency order: one pass suffices
            if any(n in names or n in found for n in step.needs):
                found.add(name)
        return found


# -- helpers -------------------------------------------------------------------------------------

class _Unresolved(Exception):
    def __init__(self, name: str, hint: str = "", closed: bool = True):
        super().__init__(name)
        self.name, self.hint, self.closed = name, hint, closed

    @property
    def what(self) -> str:
        """"unresolved ${name}", or for a ``${`` with no ``}`` after it, that."""
        return f"unresolved ${{{self.name}}}" if self.closed else f"'${{{self.name}' has no closing '}}'"


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def substitute(value: object, lookup: Callable[[str], object]) -> object:
    """Replace ``${name}`` in strings (lists too) by ``lookup(name)``; ``$$`` is a literal ``$``.

    A string that is exactly one reference keeps the referenced value's type (a number, a bool).
    """
    if isinstance(value, list):
        return [substitute(v, lookup) for v in value]
    if not isinstance(value, str):
        return value
    m = WHOLE_REF_RE.match(value)
    if m:
        return lookup(m.group(1).strip())
    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        if m.group(1) is None:
            raise _Unresolved(value[m.end():], closed=False)
        return _text(lookup(m.group(1).strip()))

    return REF_RE.sub(one, value)


def references(value: object) -> list[str]:
    """The names referenced by ``${…}`` in a (list of) string(s)."""
    if isinstance(value, list):
        return [r for v in value for r in references(v)]
    if not isinstance(value, str):
        return []
    return [m.group(1).strip() for m in REF_RE.finditer(value) if m.group(1) is not None]


def suggest(name: str, known: Iterable[str]) -> str:
    known = sorted(set(known))
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (known: {', '.join(known)})" if known else ""


def _jsonable(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def input_digest(path: str | Path) -> str | None:
    """``sha256:<hex>`` of a file; for a folder a digest of its listing (names, sizes, mtimes); None if missing.
    For a URL (``s3://…``) a digest of what the store lists for the object, or for every object under the
    prefix (names, sizes, ETags or checksums): nothing is downloaded. Raises StorageError (one sentence) when
    the store cannot be asked."""
    where = local_place(path) or as_path(path)  # (file:///data/x is /data/x)
    if isinstance(where, RemotePath):
        try:
            listing = where.listing()
        except StorageError:
            raise
        except Exception as e:  # credentials, permissions, the network: what the store said, in one line
            raise StorageError(f"{type(e).__name__}: {e}".splitlines()[0]) from None
        if listing is None:
            return None
        return "objects:" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    path = where
    if path.is_file():
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return f"sha256:{h.hexdigest()}"
    if path.is_dir():
        listing = []
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                st = os.stat(os.path.join(root, name))
                listing.append([os.path.relpath(os.path.join(root, name), path), st.st_size, st.st_mtime_ns])
        return "dir:" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    return None


#: what a path under the workdir starts with in a step's recorded settings and fingerprint
WORKDIR_TOKEN = "${workdir}"


def portable(settings: Mapping, workdir, keys: bool = False) -> dict:
    """``settings`` with every string that is ``workdir`` or a path under it (as written, absolute or resolved)
    starting ``${workdir}`` instead (``keys``: in its keys, not its values): the same workdir named another way
    (``runs/a``, ``./runs/a``, ``/home/me/runs/a``), moved, or mounted elsewhere on another machine, has the same
    fingerprints."""
    names = {str(workdir).rstrip("/")}
    if isinstance(workdir, Path):
        names |= {os.path.abspath(workdir), str(workdir.resolve())}
    names = sorted((n for n in names if n), key=len, reverse=True)

    def one(value):
        if isinstance(value, list):
            return [one(v) for v in value]
        if isinstance(value, str):
            for name in names:
                if value == name or value.startswith(name + "/"):
                    return WORKDIR_TOKEN + value[len(name):]
        return value

    return {one(k): v for k, v in settings.items()} if keys else {k: one(v) for k, v in settings.items()}


def own_fingerprint(command: str, settings: Mapping, inputs: Mapping[str, str | None], code: str) -> str:
    """The sha256 of what a step is, apart from its upstream's outputs (see the module's docstring)."""
    doc = {"command": command, "code_version": code, "settings": settings, "inputs": dict(sorted(inputs.items()))}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def _long_opt(opts: list[str]) -> str:
    longs = [o for o in opts if o.startswith("--")]
    return longs[0] if longs else opts[0]


def _option_args(param: click.Option, value: object) -> list[str]:
    name = _long_opt(param.opts)
    if param.count:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{param.name} counts: give a whole number, got {value!r}")
        return [name] * value
    if param.is_flag:
        if not isinstance(value, bool):
            raise ValueError(f"{param.name} is a flag: give true or false, got {value!r}")
        if param.secondary_opts:
            return [name if value else _long_opt(param.secondary_opts)]
        return [name] if value else []
    values = value if isinstance(value, list) else [value]
    if not param.multiple and param.nargs == 1 and isinstance(value, list):
        raise ValueError(f"{param.name} takes one value, got a list")
    out: list[str] = []
    if param.nargs != 1:  # one group of nargs values (or a list of groups when multiple)
        groups = values if param.multiple and values and isinstance(values[0], list) else [values]
        for group in groups:
            out += [name, *(_text(v) for v in group)]
        return out
    for v in values:
        out += [f"{name}={_text(v)}"] if name.startswith("--") else [name, _text(v)]
    return out


def find_command(group: click.Group, path: str) -> tuple[click.Command | None, str]:
    """The command named by ``path`` ("label", "weights fetch") in ``group``, or (None, why not)."""
    command: click.Command = group
    words = path.split()
    if not words:
        return None, "'run' names no command"
    if words[0] in RUNNER_COMMANDS:
        return None, f"`{words[0]}` cannot be a step (the runner does not run itself)"
    for i, word in enumerate(words):
        commands = getattr(command, "commands", None)
        if commands is None:
            return None, f"`{' '.join(words[:i])}` has no subcommands"
        if word not in commands:
            known = sorted(set(commands) - (RUNNER_COMMANDS if i == 0 else set()))
            return None, f"unknown command {' '.join(words[:i + 1])!r}{suggest(word, known)}"
        command = commands[word]
    if isinstance(command, click.Group):
        return None, f"`{path}` is a group: name one of its commands ({', '.join(sorted(command.commands))})"
    return command, ""


def build_args(command: click.Command, values: Mapping[str, object]) -> list[str]:
    """The command line (after the command name) for parameter values given by click name."""
    options, positional = [], []
    for param in command.params:
        if param.name not in values or values[param.name] is None:
            continue
        value = values[param.name]
        if isinstance(param, click.Argument):
            positional += [_text(v) for v in (value if isinstance(value, list) else [value])]
        else:
            options += _option_args(param, value)
    if any(a.startswith("-") for a in positional):
        return options + ["--"] + positional
    return positional + options


# -- the YAML document with line numbers --------------------------------------------------------

#: limits checked on the YAML events before anything is built: a manifest is a small hand-written file, and
#: aliases can make a few hundred bytes expand to gigabytes ("billion laughs")
MAX_MANIFEST_BYTES = 1 << 20
MAX_NODES = 100_000  # after every alias is expanded
MAX_DEPTH = 64


def check_yaml_size(display: str, text: str) -> None:
    """Refuse a document whose expanded size (aliases counted as what they stand for) or nesting is beyond
    the limits, reading only its events (nothing is constructed)."""
    if len(text.encode()) > MAX_MANIFEST_BYTES:
        raise ManifestError([f"{display}: the manifest is larger than {MAX_MANIFEST_BYTES >> 20} MiB"])
    sizes: dict[str, int] = {}  # anchor -> nodes it stands for
    stack: list[list] = [[0, None]]  # [nodes so far, anchor] per open collection
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            stack.append([1, event.anchor])
            if len(stack) > MAX_DEPTH:
                raise ManifestError([f"{display}:{event.start_mark.line + 1}: the manifest nests deeper than "
                                     f"{MAX_DEPTH} levels"])
            continue
        if isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            count, anchor = stack.pop()
        elif isinstance(event, yaml.ScalarEvent):
            count, anchor = 1, event.anchor
        elif isinstance(event, yaml.AliasEvent):
            if any(open_anchor == event.anchor for _, open_anchor in stack):
                raise ManifestError([f"{display}:{event.start_mark.line + 1}: the alias *{event.anchor} stands inside "
                                     f"the value its anchor &{event.anchor} names (a value that contains itself)"])
            count, anchor = sizes.get(event.anchor, 1), None
        else:
            continue
        if anchor is not None:
            sizes[anchor] = count
        stack[-1][0] += count
        if stack[-1][0] > MAX_NODES:
            raise ManifestError([f"{display}:{event.start_mark.line + 1}: the manifest expands to more than "
                                 f"{MAX_NODES:,} values (aliases of aliases?); refused before reading it"])


class _Doc:
    """The parsed YAML plus the line of every mapping key and list item, by key path."""

    def __init__(self, display: str, text: str):
        check_yaml_size(display, text)
        self.display = display
        self.lines: dict[tuple, int] = {}
        self.duplicates: list[tuple[tuple, int, int]] = []
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            self.data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
        if node is not None:
            self._walk(node, ())

    def _walk(self, node: yaml.Node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                p = path + (key,)
                line = key_node.start_mark.line + 1
                if p in self.lines:  # the later value wins, as in the parsed data: forget the earlier one's lines
                    self.duplicates.append((p, line, self.lines[p]))
                    for q in [q for q in self.lines if q[:len(p)] == p]:
                        del self.lines[q]
                self.lines[p] = line
                self._walk(value_node, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.lines[path + (i,)] = item.start_mark.line + 1
                self._walk(item, path + (i,))

    def line(self, *path) -> int:
        for n in range(len(path), 0, -1):
            if tuple(path[:n]) in self.lines:
                return self.lines[tuple(path[:n])]
        return 1

    def at(self, *path) -> str:
        return f"{self.display}:{self.line(*path)}"


# -- loading -------------------------------------------------------------------------------------

def parse_sets(sets: Iterable[str]) -> dict[str, object]:
    """``NAME=VALUE`` overrides of vars; VALUE is read as a YAML scalar (``8`` is a number, ``true`` a bool)."""
    out = {}
    for item in sets:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"expected NAME=VALUE, got {item!r}", param_hint="--set")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        out[name.strip()] = value if isinstance(value, (str, int, float, bool)) or value is None else text
    return out


def dependency_order(deps: Mapping[str, list[str]]) -> tuple[list[str], list[list[str]]]:
    """(steps in dependency order, declaration order where free; the cycles found, each as [a, b, …, a]
    where a needs b, starting from the first declared step on it).

    ``graphlib`` orders and finds each cycle; a step on a cycle, or after one, is left out of the order.
    """
    declared = {name: i for i, name in enumerate(deps)}
    graph = {name: [d for d in ds if d in declared] for name, ds in deps.items()}
    cycles: list[list[str]] = []
    while True:
        sorter = graphlib.TopologicalSorter(graph)
        try:
            sorter.prepare()
            break
        except graphlib.CycleError as e:
            found = list(reversed(e.args[1][:-1]))  # graphlib lists predecessors first; a "needs" b reads back
            first = min(range(len(found)), key=lambda i: declared[found[i]])
            cycle = found[first:] + found[:first]
            cycles.append(cycle + [cycle[0]])
            for a, b in zip(cycle, cycle[1:] + cycle[:1]):  # cut the cycle to find the others
                graph[a] = [d for d in graph[a] if d != b]
    order: list[str] = []
    ready: list[str] = []
    on_cycle = {n for c in cycles for n in c}
    while sorter.is_active():
        ready = sorted([*ready, *sorter.get_ready()], key=declared.__getitem__)
        name = ready.pop(0)
        order.append(name)
        sorter.done(name)
    after = set(on_cycle)
    for name in order:  # dependency order: one pass finds everything after a cycle
        if any(d in after for d in deps[name]):
            after.add(name)
    return [n for n in order if n not in after], cycles


class _Loader:
    """The steps of :func:`load_manifest`: each records its problems in ``errors`` and goes on."""

    def __init__(self, path: Path, group: click.Group, digest: Callable[[Path], str | None]):
        self.path, self.group, self.digest = path, group, digest
        self.display = str(path)
        self.errors: list[str] = []
        self.digests: dict[object, str | None] = {}  # an input shared by several steps is read once

    def error(self, where: str, message: str) -> None:
        self.errors.append(f"{where}: {message}")

    def fail(self) -> ManifestError:
        return ManifestError(self.errors)

    # -- parsing -----------------------------------------------------------------------------------
    def parse(self) -> dict:
        """The YAML document (line numbers kept), checked to be a mapping of the known top-level keys."""
        display = self.display
        try:
            text = self.path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ManifestError([f"{display}: cannot read the manifest: {getattr(e, 'strerror', None) or e}"]) \
                from None
        try:
            self.doc = doc = _Doc(display, text)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            line = mark.line + 1 if mark else 1
            problem = " ".join(x for x in (e.context, e.problem) if x)
            raise ManifestError([f"{display}:{line}: invalid YAML: {problem}"]) from None
        except yaml.YAMLError as e:  # e.g. a NUL byte: PyYAML's reader adds a line on where
            problem = (str(e).splitlines() or [type(e).__name__])[0]
            raise ManifestError([f"{display}: invalid YAML: {problem}"]) from None
        data = doc.data
        if not isinstance(data, dict):
            raise ManifestError([f"{display}:1: a manifest is a mapping with keys {', '.join(TOP_KEYS)}"
                                 + ("; this file is empty" if data is None else f", not a {type(data).__name__}")])
        for p, line, first in doc.duplicates:
            self.error(f"{display}:{line}", f"duplicate key {p[-1]!r} (first at line {first})")
        for key in data:
            if key not in TOP_KEYS:
                self.error(doc.at(key), f"unknown top-level key {key!r}{suggest(str(key), TOP_KEYS)}")
        return data

    # -- vars ----------------------------------------------------------------------------------------
    def variables(self, data: dict, sets, workdir) -> tuple[Path, dict[str, object]]:
        """(workdir, vars) with ``--set`` overrides applied and every ``${…}`` among them substituted."""
        doc, display = self.doc, self.display
        raw_vars = data.get("vars") or {}
        if not isinstance(raw_vars, dict):
            self.error(doc.at("vars"), "vars must be a mapping of NAME: value")
            raw_vars = {}
        raw_vars = dict(raw_vars)
        for name, value in list(raw_vars.items()):
            if not isinstance(name, str) or not NAME_RE.match(name) or name in RESERVED_VARS:
                self.error(doc.at("vars", name), f"invalid var name {name!r}" + (
                    " (reserved)" if name in RESERVED_VARS else " (letters, digits, _ and -)"))
                raw_vars.pop(name)
            elif isinstance(value, (dict, list)):
                self.error(doc.at("vars", name), f"var {name!r} must be a single value, not a {type(value).__name__}")
                raw_vars.pop(name)
        overrides = parse_sets(sets) if not isinstance(sets, Mapping) else dict(sets)
        for name, value in overrides.items():
            if name not in raw_vars:
                self.error(display, f"--set {name}: the manifest has no var {name!r}{suggest(name, raw_vars)}")
            else:
                raw_vars[name] = value
        if workdir is not None:
            raw_vars["workdir"] = str(workdir)
        else:
            wd = data.get("workdir", f"runs/{self.path.stem}")
            if not isinstance(wd, str) or not wd.strip():
                self.error(doc.at("workdir"), "workdir must be a path")
                wd = f"runs/{self.path.stem}"
            raw_vars["workdir"] = wd
        from teachers.weights import checkpoint_dir

        raw_vars["weights_cache"] = str(checkpoint_dir())

        resolved: dict[str, object] = {}

        def var(name: str, chain: tuple[str, ...] = ()) -> object:
            if name in resolved:
                return resolved[name]
            if name.startswith("steps."):
                raise _Unresolved(name, "${steps.NAME.out} can only be used in steps")
            if name not in raw_vars:
                raise _Unresolved(name, suggest(name, raw_vars).strip())
            if name in chain:
                raise _Unresolved(name, "(vars refer to each other in a cycle: " + " -> ".join(chain + (name,)) + ")")
            value = substitute(raw_vars[name], lambda n: var(n, chain + (name,)))
            resolved[name] = value
            return value

        for name in raw_vars:
            try:
                var(name)
            except _Unresolved as e:
                where = doc.at("workdir") if name == "workdir" else doc.at("vars", name)
                self.error(where, f"{e.what} in {'workdir' if name == 'workdir' else 'var ' + repr(name)}"
                           + (f" {e.hint}" if e.hint else ""))
                resolved.setdefault(name, "")
        wd = _text(resolved["workdir"])
        if (local := file_path(wd)) is not None:  # file:///x: the local folder /x, locked as one
            wd = local
        if _URL_RE.match(wd):  # object storage: the steps' outputs go there, the state too (pipeline.manifest.runner)
            return as_path(_url(wd)), {k: v for k, v in resolved.items() if k != "workdir"}
        return Path(wd), {k: v for k, v in resolved.items() if k != "workdir"}

    # -- steps: structure ----------------------------------------------------------------------------
    def declare(self, data: dict) -> tuple[dict[str, dict], dict[str, list[str]]]:
        """Each step's declaration checked for shape, and its dependencies (needs + ${steps.NAME.out})."""
        doc = self.doc
        raw_steps = data.get("steps")
        if not isinstance(raw_steps, dict) or not raw_steps:
            self.error(doc.at("steps") if "steps" in data else f"{self.display}:1",
                       "steps must be a non-empty mapping of NAME: step")
            raise self.fail()
        decl: dict[str, dict] = {}
        for name, body in raw_steps.items():
            if not isinstance(name, str) or not NAME_RE.match(name):
                self.error(doc.at("steps", name), f"invalid step name {name!r} (letters, digits, _ and -, starting with a letter or _)")
                continue
            if not isinstance(body, dict):
                self.error(doc.at("steps", name), f"step {name!r} must be a mapping with keys {', '.join(STEP_KEYS)}")
                continue
            decl[name] = self._declare_step(name, body)
        deps = {name: self._dependencies(name, d, raw_steps) for name, d in decl.items()}
        return decl, {n: [x for x in ds if x in decl] for n, ds in deps.items()}

    def _declare_step(self, name: str, body: dict) -> dict:
        doc, ok = self.doc, True
        for key in body:
            if key not in STEP_KEYS:
                self.error(doc.at("steps", name, key), f"step {name!r}: unknown key {key!r}{suggest(str(key), STEP_KEYS)}")
                ok = False
        if not isinstance(body.get("run"), str):
            self.error(doc.at("steps", name, "run"), f"step {name!r}: 'run: COMMAND' is required (a `pipeline` command)")
            ok = False
        if not isinstance(body.get("with") or {}, dict):
            self.error(doc.at("steps", name, "with"), f"step {name!r}: 'with' must be a mapping of option: value")
            ok = False
        needs = body.get("needs") or []
        needs = [needs] if isinstance(needs, str) else needs
        if not isinstance(needs, list) or not all(isinstance(n, str) for n in needs):
            self.error(doc.at("steps", name, "needs"), f"step {name!r}: 'needs' must be a list of step names")
            ok, needs = False, []
        inputs = body.get("inputs") or []
        inputs = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(inputs, list) or not all(isinstance(p, str) for p in inputs):
            self.error(doc.at("steps", name, "inputs"), f"step {name!r}: 'inputs' must be a list of paths")
            ok, inputs = False, []
        resources = body.get("resources") or {}
        if not isinstance(resources, dict):
            self.error(doc.at("steps", name, "resources"), f"step {name!r}: 'resources' must be a mapping (cpus, gpus)")
            ok, resources = False, {}
        for key, value in resources.items():
            if key not in RESOURCE_KEYS:
                self.error(doc.at("steps", name, "resources", key),
                           f"step {name!r}: unknown resource {key!r}{suggest(str(key), RESOURCE_KEYS)}")
                ok = False
            elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
                self.error(doc.at("steps", name, "resources", key),
                           f"step {name!r}: resource {key} must be a whole number >= 0, got {value!r}")
                ok = False
        resources = {k: v for k, v in resources.items() if k in RESOURCE_KEYS}  # (the others are errors above)
        return {"body": body, "needs": needs, "inputs": inputs, "resources": resources, "ok": ok}

    def _dependencies(self, name: str, d: dict, raw_steps: Mapping) -> list[str]:
        doc, deps = self.doc, list(d["needs"])
        for i, need in enumerate(d["needs"]):
            if need not in raw_steps:
                self.error(doc.at("steps", name, "needs", i), f"step {name!r} needs unknown step {need!r}"
                           f"{suggest(need, raw_steps)}")
                d["ok"] = False
        given = d["body"].get("with")
        refs = [(("with", key), r) for key, v in (given if isinstance(given, dict) else {}).items()
                for r in references(v)] + \
               [(("inputs", i), r) for i, v in enumerate(d["inputs"]) for r in references(v)]
        for where, ref in refs:
            m = STEP_REF_RE.match(ref)
            if not m:
                continue
            upstream, attr = m.groups()
            if upstream not in raw_steps:
                self.error(doc.at("steps", name, *where), f"step {name!r}: ${{{ref}}} names unknown step "
                           f"{upstream!r}{suggest(upstream, raw_steps)}")
                d["ok"] = False
            elif attr != "out":
                self.error(doc.at("steps", name, *where), f"step {name!r}: ${{{ref}}}: only ${{steps.NAME.out}} is known")
                d["ok"] = False
            elif upstream not in deps:
                deps.append(upstream)
        return deps

    # -- steps: resolution against the commands --------------------------------------------------------
    def resolve(self, workdir: Path, manifest_vars: Mapping[str, object], decl: dict[str, dict],
                deps: dict[str, list[str]]) -> dict[str, Step]:
        """Every step validated by its command (even below a broken one, whose ``${steps.X.out}`` then stands
        for a placeholder); steps that need nothing broken get their settings, output and fingerprint."""
        order, cycles = dependency_order(deps)
        for cycle in cycles:  # a -> b: a needs b
            self.error(self.doc.at("steps", cycle[0]), "cycle in needs: " + " -> ".join(cycle))
        broken: set[str] = {n for n, d in decl.items() if not d["ok"]} | (set(decl) - set(order))
        # a step with a key given twice is that one error: which value was meant is unknown, and the options of
        # the other command (the last `run:`) said first, six lines of them, hid it
        doubled = {p[1] for p, _, _ in self.doc.duplicates if len(p) > 2 and p[0] == "steps"}
        steps: dict[str, Step] = {}
        for name in order + [n for n in decl if n not in order]:
            body = decl[name]["body"]
            if name in doubled:
                broken.add(name)
                continue
            if not isinstance(body.get("run"), str) or not isinstance(body.get("with") or {}, dict):
                continue
            step = self._resolve_step(name, decl[name], deps[name], workdir, manifest_vars, steps)
            if step is None or name in broken or not all(u not in broken and u in steps for u in deps[name]):
                broken.add(name)  # validated, but no fingerprint
            else:
                steps[name] = step
        writers: dict[str, str] = {}  # one step per output: two would take each other's work for their own
        for name, step in steps.items():
            if step.output is None:
                continue
            where = step.output if is_url(step.output) else str(Path(step.output).resolve())
            if where in writers:
                self.error(self.doc.at("steps", name), f"steps {writers[where]!r} and {name!r} write the same output "
                           f"{step.output}; give one of them another out")
            writers.setdefault(where, name)
        return steps

    def _lookup(self, workdir: Path, manifest_vars: Mapping[str, object], steps: Mapping[str, Step]):
        def lookup(ref: str) -> object:
            m = STEP_REF_RE.match(ref)
            if m:
                upstream = steps.get(m.group(1))
                if upstream is None:  # broken itself (reported): validate with a stand-in
                    return f"<{m.group(1)}.out>"
                if upstream.output is None:
                    raise _Unresolved(ref, f"(`{upstream.command}` has no output folder known to "
                                           "pipeline.manifest.steps)")
                return upstream.output
            if ref == "workdir":
                return str(workdir)
            if ref in manifest_vars:
                return manifest_vars[ref]
            raise _Unresolved(ref, suggest(ref, list(manifest_vars) + ["workdir"]).strip())
        return lookup

    def _values(self, name: str, command: click.Command, command_name: str, body: dict, lookup) -> tuple[dict, dict]:
        """The step's parameter values by click name (``${…}`` substituted), and the keys as written."""
        doc = self.doc
        params = {p.name: p for p in command.params}
        # an option is also known by its long flag (--format for the parameter format_)
        flags = {o[2:].replace("-", "_"): p.name for p in command.params for o in getattr(p, "opts", ())
                 if o.startswith("--")}
        values: dict[str, object] = {}
        key_of: dict[str, object] = {}  # click name -> key as written (for line numbers)
        for key, value in (body.get("with") or {}).items():
            pname = str(key).replace("-", "_")
            pname = pname if pname in params else flags.get(pname, pname)
            if pname not in params:
                keys = set(flags) | {p.name for p in command.params if not any(o.startswith("--") for o in p.opts)}
                self.error(doc.at("steps", name, "with", key), f"step {name!r}: unknown option {key!r} for "
                           f"`{command_name}`{suggest(pname, keys)}")  # the keys a manifest writes: options' names
                continue
            try:
                values[pname] = substitute(value, lookup)
            except _Unresolved as e:
                self.error(doc.at("steps", name, "with", key), f"step {name!r}: {e.what} in {key}"
                           + (f" {e.hint}" if e.hint else ""))
                continue
            key_of[pname] = key
        return values, key_of

    def _resolve_step(self, name: str, d: dict, needs: list[str], workdir: Path,
                      manifest_vars: Mapping[str, object], steps: Mapping[str, Step]) -> Step | None:
        doc, body = self.doc, d["body"]
        errors_before = len(self.errors)
        command_name = " ".join(body["run"].split())  # "label", or "weights fetch" for a group's command
        command, problem = find_command(self.group, command_name)
        if command is None:
            self.error(doc.at("steps", name, "run"), f"step {name!r}: {problem}")
            return None
        spec = COMMANDS.get(command_name)
        lookup = self._lookup(workdir, manifest_vars, steps)
        values, key_of = self._values(name, command, command_name, body, lookup)
        if spec is not None:
            for pname, default in spec.defaults.items():
                if values.get(pname) is None:
                    values[pname] = str(default(workdir, name))
        inputs: list[str] = []
        for i, value in enumerate(d["inputs"]):
            try:
                inputs.append(_text(substitute(value, lookup)))
            except _Unresolved as e:
                self.error(doc.at("steps", name, "inputs", i), f"step {name!r}: {e.what} in inputs"
                           + (f" {e.hint}" if e.hint else ""))
        if len(self.errors) > errors_before:
            return None
        try:
            args = build_args(command, values)
        except ValueError as e:
            self.error(doc.at("steps", name, "with"), f"step {name!r}: {e}")
            return None
        flag = {p.name: p.opts[0] for p in command.params if isinstance(p, click.Option)}

        def url_refused(k, v) -> None:
            takes = ", ".join(sorted(flag[u] for u in spec.urls)) if spec else "no option"
            self.error(doc.at("steps", name), URL_STEP.format(name, _url(str(v)), command_name, flag.get(k, k), takes))

        try:
            ctx = command.make_context(f"pipeline {command_name}", list(args), resilient_parsing=False)
        except click.ClickException as e:
            param = getattr(e, "param", None)
            given = values.get(param.name) if param is not None else None
            url = next((v for v in (given if isinstance(given, (tuple, list)) else (given,))
                        if v is not None and _URL_RE.match(str(v)) and not str(v).lower().startswith(
                            ("http:", "https:", "file:"))), None)
            if url is not None and (spec is None or param.name not in spec.urls):  # said as below, naming those
                url_refused(param.name, url)  # that take one (the option's own check refused it first)
                return None
            where = doc.at("steps", name, "with", key_of[param.name]) if param is not None and param.name in key_of \
                else doc.at("steps", name)
            self.error(where, f"step {name!r}: {' '.join(e.format_message().split())}")
            return None
        except click.exceptions.Exit:
            self.error(doc.at("steps", name), f"step {name!r}: these options only print help or a version")
            return None
        with ctx:
            settings = {p.name: _jsonable(ctx.params[p.name]) for p in command.params  # the command's order
                        if p.name in ctx.params and (spec is None or (
                            p.name not in spec.volatile
                            and not (p.name in spec.added and ctx.params[p.name] == spec.added[p.name])))}
            urls = [(k, v) for k, value in ctx.params.items() if spec is None or k not in spec.urls
                    for v in (value if isinstance(value, (tuple, list)) else (value,))
                    if isinstance(v, (str, Path)) and _URL_RE.match(str(v))
                    and not str(v).lower().startswith(("http:", "https:"))]  # weights may be downloaded
            if urls:
                url_refused(*urls[0])
                return None
            output = None
            if spec is not None and spec.output is not None:
                try:
                    output = str(spec.output(ctx.params))
                except (ValueError, KeyError, TypeError) as e:
                    self.error(doc.at("steps", name), f"step {name!r}: {e}")
                    return None
        if any(u not in steps for u in needs):  # needs a broken step: no fingerprint
            return None
        digests = {}
        for i, p in enumerate(inputs):
            if p not in self.digests:
                try:
                    self.digests[p] = self.digest(p if is_url(p) else Path(p))
                except StorageError as e:
                    self.error(doc.at("steps", name, "inputs", i), f"step {name!r}: input {p}: {e}")
                    return None
            digests[p] = self.digests[p]
        made = {pname for pname, key in key_of.items()  # (an upstream step's output is fingerprinted as one)
                if any(r.startswith("steps.") for r in references((body.get("with") or {}).get(key)))}
        paths = []
        if spec is not None and spec.must_exist is not None:
            for pname in spec.must_exist(ctx.params):
                value = ctx.params.get(pname)
                for v in value if isinstance(value, (tuple, list)) else (value,):
                    if v is not None and pname not in made and "://" not in str(v):
                        paths.append((flag.get(pname, pname), str(v)))
        if spec is not None and spec.reads is not None:  # what the command reads that need not be declared
            for pname, (p, read) in spec.reads(ctx.params).items():
                if pname not in made and p not in digests:
                    key = (command_name, pname, p, str(ctx.params.get("out")))  # read once per manifest
                    if key not in self.digests:
                        self.digests[key] = read()
                    digests[p] = self.digests[key]
        res = Resources(**{**Resources().__dict__, **d["resources"]})
        code = code_version()
        recorded, recorded_inputs = portable(settings, workdir), portable(digests, workdir, keys=True)
        return Step(name=name, command=command_name, args=tuple(args), settings=settings, needs=tuple(needs),
                    inputs=digests, resources=res, output=output,
                    own_fingerprint=own_fingerprint(command_name, recorded, recorded_inputs, code),
                    code_version=code, line=doc.line("steps", name), paths=tuple(paths), recorded_settings=recorded,
                    recorded_inputs=recorded_inputs)


def load_manifest(path: str | Path, sets: Iterable[str] | Mapping[str, object] = (), workdir: str | Path | None = None,
                  *, group: click.Group, digest: Callable[[Path], str | None] = input_digest) -> Manifest:
    """Parse, validate and resolve the manifest at ``path``; raise :class:`ManifestError` listing every problem.

    ``sets`` overrides vars (``NAME=VALUE`` strings or a mapping), ``workdir`` the manifest's workdir;
    ``group`` is the click group whose commands the steps run (the ``pipeline`` CLI hands itself in).
    """
    path = Path(path)
    loader = _Loader(path, group, digest)
    data = loader.parse()
    workdir_path, manifest_vars = loader.variables(data, sets, workdir)
    decl, deps = loader.declare(data)
    steps = loader.resolve(workdir_path, manifest_vars, decl, deps)
    if loader.errors:
        raise loader.fail()
    return Manifest(path=path, workdir=workdir_path, vars=manifest_vars, steps=steps)
