"""What each teacher needs on disk, whether it is here and intact, and fetching all of it at once.

``pipeline weights fetch NAME``, ``pipeline teachers`` and ``pipeline run --dry-run`` speak through
these functions, so the three agree on what a teacher needs and how to get what is missing.
"""

from __future__ import annotations

from teachers.registry import DEFAULT_WEIGHTS, RELEASES, available, fetchable_weights, required_weights
from teachers.weights import (KNOWN_WEIGHTS, WeightsError, cache_path, cached_state, describe, file_digest,
                              is_http_url, resolve, states_summary)

#: where the bundled manifests expect a converted SalGAN generator
SALGAN_CHECKPOINT = "data/weights/salgan_generator.pt"


def fetch_hint(teacher: str) -> str:
    """The command that gets what ``teacher`` needs (with network), or ""."""
    return f"pipeline weights fetch {teacher}" if fetchable_weights(teacher) else ""


def convert_hint(teacher: str, dst: str = SALGAN_CHECKPOINT) -> str:
    """For a teacher whose release needs converting: the command that turns the fetched file into ``dst``."""
    if teacher not in RELEASES:
        return ""
    name, template = RELEASES[teacher]
    return template.format(src=cache_path(name), dst=dst)


def weights_status(teacher: str) -> str:
    """``pipeline teachers``' weights column: none needed, cached (verified or not), corrupt, not cached,
    or needs --weights."""
    defaults = DEFAULT_WEIGHTS.get(teacher)
    if defaults is None:
        if teacher in RELEASES:
            return (f"needs --weights PATH (no published default; `{fetch_hint(teacher)}` gets the authors' "
                    f"release, `{convert_hint(teacher, 'DST.pt')}` converts it)")
        return "needs --weights PATH (no published default)"
    if not defaults:
        return "none needed"
    return states_summary([cached_state(s) for s in defaults], fetch_hint(teacher))


def fetch(spec: str, *, progress: bool = True) -> list[str]:
    """Download ``spec`` into the cache and verify it: a teacher name (every file it needs), a known name
    or an http(s) URL. Returns one line per file (path, sha256, verified or not) and, for a release that
    needs converting, the next command. Raises one WeightsError naming every file that failed."""
    if spec in available():
        specs, who = fetchable_weights(spec), f"teacher {spec}"
        if not specs:
            return [f"teacher {spec} needs no weights" if DEFAULT_WEIGHTS.get(spec) == () else
                    f"teacher {spec} has no published weights to fetch: pass --weights PATH"]
    elif spec in KNOWN_WEIGHTS or is_http_url(spec):
        specs, who = (spec,), describe(spec)
    else:
        raise WeightsError(f"nothing to fetch by the name {spec!r}: give a teacher ({', '.join(available())}), "
                           f"a known name ({', '.join(sorted(KNOWN_WEIGHTS))}) or an http(s) URL")
    lines, errors = [], []
    for s in specs:
        try:
            path = resolve(s, progress=progress)
        except WeightsError as e:
            errors.append(str(e).rstrip("."))
            continue
        pinned = KNOWN_WEIGHTS[s].sha256 if s in KNOWN_WEIGHTS else None
        lines.append(f"{path}  sha256 {file_digest(path)}  "
                     + ("(verified)" if pinned else "(unverified: no sha256 pinned)"))
    if errors:
        if len(specs) == 1:
            raise WeightsError(errors[0])
        raise WeightsError(f"{who} needs {' and '.join(describe(s) for s in specs)}; {len(errors)} could not be "
                           "fetched: " + "; ".join(f"({i}) {e}" for i, e in enumerate(errors, 1))
                           + (f"; fetched: {', '.join(l.split()[0] for l in lines)}" if lines else ""))
    if spec in RELEASES:
        lines.append(f"next: {convert_hint(spec)}   (then: --teacher {spec} --weights {SALGAN_CHECKPOINT})")
    return lines


__all__ = ["SALGAN_CHECKPOINT", "convert_hint", "fetch", "fetch_hint", "required_weights", "weights_status"]
