"""Manifests: parse, validate and resolve a YAML declaration of pipeline steps (format: docs/manifest.md).

Everything is checked before any work starts, and every problem found is reported, each as one
line ``<manifest>:<line>: <message>``. A step's options are validated by click itself: the
command line is built from ``with:`` and parsed by the command (``make_context``), so types,
ranges, choices and required options give click's own messages.

Paths in a manifest (``workdir``, vars, options, ``inputs``) are used as written: a relative
path is relative to the current directory of ``pipeline run``, not to the manifest's folder.

A step's fingerprint is the sha256 of: its command, its validated settings (every parameter of
the command with defaults filled in, less the command's volatile options, see
:mod:`pipeline.steps`), the fingerprints of the steps it needs, the sha256 of its declared
``inputs``, and the code version ``pipeline <__version__>`` (not a digest of the source files:
bump ``pipeline.__version__`` when a change should re-run finished steps).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import click
import yaml

from pipeline import __version__
from pipeline.steps import COMMANDS

TOP_KEYS = ("workdir", "vars", "steps")
STEP_KEYS = ("run", "with", "needs", "inputs", "resources")
RESOURCE_KEYS = ("cpus", "gpus")
RUNNER_COMMANDS = frozenset({"run", "status"})  # the runner's own commands cannot be steps
NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")
REF_RE = re.compile(r"\$\$|\$\{([^}]*)\}")
WHOLE_REF_RE = re.compile(r"\$\{([^}]*)\}\Z")
STEP_REF_RE = re.compile(r"steps\.([^.]*)\.(.*)\Z")
CODE_VERSION = f"pipeline {__version__}"


class ManifestError(click.ClickException):
    """The manifest is invalid; ``errors`` holds one ``file:line: message`` line per problem."""

    exit_code = 2

    def __init__(self, errors: list[str]):
        errors = sorted(errors, key=lambda e: int(m.group(1)) if (m := re.match(r"[^\n]*?:(\d+): ", e)) else 0)
        super().__init__("\n".join(errors))
        self.errors = errors

    def show(self, file=None) -> None:
        for line in self.errors:
            click.echo(f"error: {line}", err=True, file=file)


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
    output: str | None  # the step's output folder (None: the command has no entry in pipeline.steps)
    fingerprint: str
    code_version: str
    line: int  # where the step is declared


@dataclass(frozen=True)
class Manifest:
    path: Path
    workdir: Path
    vars: Mapping[str, object]
    steps: Mapping[str, Step]  # in dependency order (declaration order where free)

    @property
    def state_dir(self) -> Path:
        return self.workdir / ".pipeline"

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
    def __init__(self, name: str, hint: str = ""):
        super().__init__(name)
        self.name, self.hint = name, hint


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
    return REF_RE.sub(lambda m: "$" if m.group(0) == "$$" else _text(lookup(m.group(1).strip())), value)


def references(value: object) -> list[str]:
    """The names referenced by ``${…}`` in a (list of) string(s)."""
    if isinstance(value, list):
        return [r for v in value for r in references(v)]
    if not isinstance(value, str):
        return []
    return [m.group(1).strip() for m in REF_RE.finditer(value) if m.group(0) != "$$"]


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
    """``sha256:<hex>`` of a file; for a folder a digest of its listing (names, sizes, mtimes); None if missing."""
    path = Path(path)
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


def fingerprint(command: str, settings: Mapping, needs: Mapping[str, str], inputs: Mapping[str, str | None],
                code_version: str = CODE_VERSION) -> str:
    doc = {"command": command, "code_version": code_version, "settings": settings,
           "needs": dict(sorted(needs.items())), "inputs": dict(sorted(inputs.items()))}
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

class _Doc:
    """The parsed YAML plus the line of every mapping key and list item, by key path."""

    def __init__(self, display: str, text: str):
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


def _find_cycles(deps: Mapping[str, list[str]]) -> list[list[str]]:
    """Each cycle once, as [a, b, …, a] where a needs b, starting from the first declared step on it."""
    cycles, seen_sets = [], set()
    state: dict[str, int] = {}  # 1 on the stack, 2 finished
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for dep in deps.get(name, []):
            if dep not in deps:
                continue
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):]
                key = frozenset(cycle)
                if key not in seen_sets:
                    seen_sets.add(key)
                    order = list(deps)
                    first = min(range(len(cycle)), key=lambda i: order.index(cycle[i]))
                    cycle = cycle[first:] + cycle[:first]
                    cycles.append(cycle + [cycle[0]])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[name] = 2

    for name in deps:
        if name not in state:
            visit(name)
    return cycles


def _topo_order(deps: Mapping[str, list[str]]) -> list[str]:
    """Dependency order, declaration order where free; steps on or after a cycle are left out."""
    order, placed = [], set()
    while True:
        name = next((n for n in deps if n not in placed and all(d in placed for d in deps[n])), None)
        if name is None:
            return order
        order.append(name)
        placed.add(name)


def load_manifest(path: str | Path, sets: Iterable[str] | Mapping[str, object] = (), workdir: str | Path | None = None,
                  *, group: click.Group | None = None,
                  digest: Callable[[Path], str | None] = input_digest) -> Manifest:
    """Parse, validate and resolve the manifest at ``path``; raise :class:`ManifestError` listing every problem.

    ``sets`` overrides vars (``NAME=VALUE`` strings or a mapping), ``workdir`` the manifest's workdir;
    ``group`` is the click group whose commands steps run (default: the ``pipeline`` CLI).
    """
    if group is None:
        from pipeline.cli import cli as group
    digests_seen: dict[str, str | None] = {}  # an input shared by several steps is read once
    path = Path(path)
    display = str(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError([f"{display}: cannot read the manifest: {getattr(e, 'strerror', None) or e}"]) from None
    try:
        doc = _Doc(display, text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        problem = " ".join(x for x in (e.context, e.problem) if x)
        raise ManifestError([f"{display}:{line}: invalid YAML: {problem}"]) from None
    except yaml.YAMLError as e:
        raise ManifestError([f"{display}: invalid YAML: {e}"]) from None

    errors: list[str] = []

    def error(where: str, message: str) -> None:
        errors.append(f"{where}: {message}")

    data = doc.data
    if not isinstance(data, dict):
        raise ManifestError([f"{display}:1: a manifest is a mapping with keys {', '.join(TOP_KEYS)}"
                             + ("; this file is empty" if data is None else f", not a {type(data).__name__}")])
    for p, line, first in doc.duplicates:
        error(f"{display}:{line}", f"duplicate key {p[-1]!r} (first at line {first})")
    for key in data:
        if key not in TOP_KEYS:
            error(doc.at(key), f"unknown top-level key {key!r}{suggest(str(key), TOP_KEYS)}")

    # vars (and workdir, which may use them)
    raw_vars = data.get("vars") or {}
    if not isinstance(raw_vars, dict):
        error(doc.at("vars"), "vars must be a mapping of NAME: value")
        raw_vars = {}
    raw_vars = dict(raw_vars)
    for name, value in list(raw_vars.items()):
        if not isinstance(name, str) or not NAME_RE.match(name) or name == "workdir":
            error(doc.at("vars", name), f"invalid var name {name!r}" + (" (reserved)" if name == "workdir" else
                                                                      " (letters, digits, _ and -)"))
            raw_vars.pop(name)
        elif isinstance(value, (dict, list)):
            error(doc.at("vars", name), f"var {name!r} must be a single value, not a {type(value).__name__}")
            raw_vars.pop(name)
    overrides = parse_sets(sets) if not isinstance(sets, Mapping) else dict(sets)
    for name, value in overrides.items():
        if name not in raw_vars:
            error(f"{display}", f"--set {name}: the manifest has no var {name!r}{suggest(name, raw_vars)}")
        else:
            raw_vars[name] = value
    if workdir is not None:
        raw_vars["workdir"] = str(workdir)
    else:
        wd = data.get("workdir", f"runs/{path.stem}")
        if not isinstance(wd, str) or not wd.strip():
            error(doc.at("workdir"), "workdir must be a path")
            wd = f"runs/{path.stem}"
        raw_vars["workdir"] = wd

    resolved: dict[str, object] = {}

    def var(name: str, chain: tuple[str, ...] = ()) -> object:
        if name in resolved:
            return resolved[name]
        if name.startswith("steps."):
            raise _Unresolved(name, "${steps.NAME.out} can only be used in steps")
        if name not in raw_vars:
            raise _Unresolved(name, suggest(name, raw_vars).strip())
        if name in chain:
            raise _Unresolved(name, "vars refer to each other in a cycle: " + " -> ".join(chain + (name,)))
        value = substitute(raw_vars[name], lambda n: var(n, chain + (name,)))
        resolved[name] = value
        return value

    for name in raw_vars:
        try:
            var(name)
        except _Unresolved as e:
            where = doc.at("workdir") if name == "workdir" else doc.at("vars", name)
            error(where, f"unresolved ${{{e.name}}} in {'workdir' if name == 'workdir' else 'var ' + repr(name)}"
                         + (f" {e.hint}" if e.hint else ""))
            resolved.setdefault(name, "")
    workdir_path = Path(_text(resolved["workdir"]))
    manifest_vars = {k: v for k, v in resolved.items() if k != "workdir"}

    # steps: structure
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, dict) or not raw_steps:
        error(doc.at("steps") if "steps" in data else f"{display}:1", "steps must be a non-empty mapping of NAME: step")
        raise ManifestError(errors)
    decl: dict[str, dict] = {}
    deps: dict[str, list[str]] = {}
    for name, body in raw_steps.items():
        if not isinstance(name, str) or not NAME_RE.match(name):
            error(doc.at("steps", name), f"invalid step name {name!r} (letters, digits, _ and -)")
            continue
        if not isinstance(body, dict):
            error(doc.at("steps", name), f"step {name!r} must be a mapping with keys {', '.join(STEP_KEYS)}")
            continue
        ok = True
        for key in body:
            if key not in STEP_KEYS:
                error(doc.at("steps", name, key), f"step {name!r}: unknown key {key!r}{suggest(str(key), STEP_KEYS)}")
                ok = False
        if not isinstance(body.get("run"), str):
            error(doc.at("steps", name, "run"), f"step {name!r}: 'run: COMMAND' is required (a `pipeline` command)")
            ok = False
        if not isinstance(body.get("with") or {}, dict):
            error(doc.at("steps", name, "with"), f"step {name!r}: 'with' must be a mapping of option: value")
            ok = False
        needs = body.get("needs") or []
        needs = [needs] if isinstance(needs, str) else needs
        if not isinstance(needs, list) or not all(isinstance(n, str) for n in needs):
            error(doc.at("steps", name, "needs"), f"step {name!r}: 'needs' must be a list of step names")
            ok, needs = False, []
        inputs = body.get("inputs") or []
        inputs = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(inputs, list) or not all(isinstance(p, str) for p in inputs):
            error(doc.at("steps", name, "inputs"), f"step {name!r}: 'inputs' must be a list of paths")
            ok, inputs = False, []
        resources = body.get("resources") or {}
        if not isinstance(resources, dict):
            error(doc.at("steps", name, "resources"), f"step {name!r}: 'resources' must be a mapping (cpus, gpus)")
            ok, resources = False, {}
        for key, value in resources.items():
            if key not in RESOURCE_KEYS:
                error(doc.at("steps", name, "resources", key),
                      f"step {name!r}: unknown resource {key!r}{suggest(str(key), RESOURCE_KEYS)}")
                ok = False
            elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
                error(doc.at("steps", name, "resources", key),
                      f"step {name!r}: resource {key} must be a whole number >= 0, got {value!r}")
                ok = False
        decl[name] = {"body": body, "needs": needs, "inputs": inputs, "resources": resources, "ok": ok}
        deps[name] = list(needs)

    # dependencies: needs + ${steps.NAME.out}
    for name, d in decl.items():
        for i, need in enumerate(d["needs"]):
            if need not in raw_steps:
                error(doc.at("steps", name, "needs", i), f"step {name!r} needs unknown step {need!r}"
                      f"{suggest(need, raw_steps)}")
                d["ok"] = False
        refs = [(("with", key), r) for key, v in (d["body"].get("with") or {}).items() for r in references(v)] + \
               [(("inputs", i), r) for i, v in enumerate(d["inputs"]) for r in references(v)]
        for where, ref in refs:
            m = STEP_REF_RE.match(ref)
            if not m:
                continue
            upstream, attr = m.groups()
            if upstream not in raw_steps:
                error(doc.at("steps", name, *where), f"step {name!r}: ${{{ref}}} names unknown step {upstream!r}"
                      f"{suggest(upstream, raw_steps)}")
                d["ok"] = False
            elif attr != "out":
                error(doc.at("steps", name, *where), f"step {name!r}: ${{{ref}}}: only ${{steps.NAME.out}} is known")
                d["ok"] = False
            elif upstream not in deps[name]:
                deps[name].append(upstream)
    deps = {n: [x for x in ds if x in decl] for n, ds in deps.items()}
    for cycle in _find_cycles(deps):  # a -> b: a needs b
        error(doc.at("steps", cycle[0]), "cycle in needs: " + " -> ".join(cycle))

    # steps: resolve and validate against the commands
    steps: dict[str, Step] = {}
    broken: set[str] = {n for n, d in decl.items() if not d["ok"]}
    order = _topo_order(deps)
    broken |= set(decl) - set(order)  # on or after a cycle (reported above)
    # every step is validated, even below a broken one (its ${steps.X.out} then stands for a placeholder)
    for name in order + [n for n in decl if n not in order]:
        d = decl[name]
        body = d["body"]
        if not isinstance(body.get("run"), str) or not isinstance(body.get("with") or {}, dict):
            continue
        ok = name not in broken and all(u not in broken and u in steps for u in deps[name])
        errors_before = len(errors)
        command_name = " ".join(body["run"].split())  # "label", or "weights fetch" for a group's command
        command, problem = find_command(group, command_name)
        if command is None:
            error(doc.at("steps", name, "run"), f"step {name!r}: {problem}")
            broken.add(name)
            continue
        spec = COMMANDS.get(command_name)

        def lookup(ref: str) -> object:
            m = STEP_REF_RE.match(ref)
            if m:
                upstream = steps.get(m.group(1))
                if upstream is None:  # broken itself (reported): validate with a stand-in
                    return f"<{m.group(1)}.out>"
                if upstream.output is None:
                    raise _Unresolved(ref, f"(`{upstream.command}` has no output folder known to pipeline.steps)")
                return upstream.output
            if ref == "workdir":
                return str(workdir_path)
            if ref in manifest_vars:
                return manifest_vars[ref]
            raise _Unresolved(ref, suggest(ref, list(manifest_vars) + ["workdir"]).strip())

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
                error(doc.at("steps", name, "with", key), f"step {name!r}: unknown option {key!r} for "
                      f"`{command_name}`{suggest(pname, params)}")
                continue
            try:
                values[pname] = substitute(value, lookup)
            except _Unresolved as e:
                error(doc.at("steps", name, "with", key), f"step {name!r}: unresolved ${{{e.name}}} in {key}"
                      + (f" {e.hint}" if e.hint else ""))
                continue
            key_of[pname] = key
        if spec is not None:
            for pname, default in spec.defaults.items():
                if values.get(pname) is None:
                    values[pname] = str(default(workdir_path, name))
        inputs: list[str] = []
        for i, value in enumerate(d["inputs"]):
            try:
                inputs.append(_text(substitute(value, lookup)))
            except _Unresolved as e:
                error(doc.at("steps", name, "inputs", i), f"step {name!r}: unresolved ${{{e.name}}} in inputs"
                      + (f" {e.hint}" if e.hint else ""))
        if len(errors) > errors_before:
            broken.add(name)
            continue

        try:
            args = build_args(command, values)
        except ValueError as e:
            error(doc.at("steps", name, "with"), f"step {name!r}: {e}")
            broken.add(name)
            continue
        try:
            ctx = command.make_context(f"pipeline {command_name}", list(args), resilient_parsing=False)
        except click.ClickException as e:
            param = getattr(e, "param", None)
            where = doc.at("steps", name, "with", key_of[param.name]) if param is not None and param.name in key_of \
                else doc.at("steps", name)
            error(where, f"step {name!r}: {' '.join(e.format_message().split())}")
            broken.add(name)
            continue
        except click.exceptions.Exit:
            error(doc.at("steps", name), f"step {name!r}: these options only print help or a version")
            broken.add(name)
            continue
        with ctx:
            settings = {p.name: _jsonable(ctx.params[p.name]) for p in command.params  # the command's order
                        if p.name in ctx.params and (spec is None or p.name not in spec.volatile)}
            output = None
            if spec is not None and spec.output is not None:
                try:
                    output = str(spec.output(ctx.params))
                except (ValueError, KeyError, TypeError) as e:
                    error(doc.at("steps", name), f"step {name!r}: {e}")
                    broken.add(name)
                    continue
        if not ok:  # needs a broken step: validated, but no fingerprint
            broken.add(name)
            continue
        digests = {p: digests_seen[p] if p in digests_seen else digests_seen.setdefault(p, digest(Path(p)))
                   for p in inputs}
        needs = tuple(deps[name])
        res = Resources(**{**Resources().__dict__, **d["resources"]})
        steps[name] = Step(
            name=name, command=command_name, args=tuple(args), settings=settings, needs=needs, inputs=digests,
            resources=res, output=output,
            fingerprint=fingerprint(command_name, settings, {n: steps[n].fingerprint for n in needs}, digests),
            code_version=CODE_VERSION, line=doc.line("steps", name))
    if errors:
        raise ManifestError(errors)
    return Manifest(path=path, workdir=workdir_path, vars=manifest_vars, steps=steps)
