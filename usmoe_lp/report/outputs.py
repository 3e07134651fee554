"""What a report directory may hold, where it may go, and how its PNGs are saved (byte-stable).

Every report directory (verify, analyze, the demo) is written through
:func:`usmoe_lp.staging.staged_directory`: built aside, swapped in only on success. To replace an
earlier report the caller must allow it (``overwrite``) and the directory must hold nothing but what
that kind of report writes; :func:`foreign_entries` lists the rest against the report's *owned*
patterns (regular expressions over relative POSIX paths, directories with a trailing ``/``).

>>> import tempfile, pathlib
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> _ = (root / "report.json").write_text("{}")
>>> (root / "notes").mkdir(); _ = (root / "notes" / "mine.txt").write_text("keep")
>>> foreign_entries(root, (r"report\\.json",))
['notes/']
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from usmoe_lp.errors import OutputExists
from usmoe_lp.logs.format import (
    FORMAT_NAME,
    MANIFEST_NAME,
    ROUTER_WEIGHTS_NAME,
    SHARD_FILE_RE,
    SHARDS_DIR,
    TMP_SUFFIX,
)

PNG_METADATA = {"Software": None}
"""savefig metadata of every report PNG: no matplotlib version (nor date) in the file, so equal
figures give equal bytes."""

ROUTER_LOG_OWNED: tuple[str, ...] = (
    *(re.escape(name) + f"(?:{re.escape(TMP_SUFFIX)})?" for name in (MANIFEST_NAME, ROUTER_WEIGHTS_NAME)),
    re.escape(SHARDS_DIR) + "/",
    SHARD_FILE_RE.pattern.removeprefix("^").removesuffix("$") + f"(?:{re.escape(TMP_SUFFIX)})?",
)
"""The entries a router log consists of (what the log writer may replace)."""


def save_png(fig, target, *, dpi: int) -> None:
    """``fig.savefig`` as PNG with :data:`PNG_METADATA` (``target``: a path or a binary file object)."""
    fig.savefig(target, format="png", dpi=dpi, metadata=PNG_METADATA)


def prefixed(prefix: str, owned: Sequence[str]) -> tuple[str, ...]:
    """The owned patterns of a report nested under ``prefix/`` (the directory itself included)."""
    return (re.escape(prefix) + "/", *(re.escape(prefix) + "/" + p for p in owned))


def foreign_entries(root: str | os.PathLike, owned: Sequence[str]) -> list[str]:
    """Entries under ``root`` (relative POSIX paths, recursively) that match none of ``owned``.

    A directory matches as ``name/``; an unmatched directory is listed once, not its content.
    Symbolic links are always foreign (a report never writes one).
    """
    pattern = re.compile("|".join(f"(?:{p})" for p in owned) or r"(?!)")
    out: list[str] = []

    def walk(directory: Path, prefix: str) -> None:
        for p in sorted(directory.iterdir()):
            rel = prefix + p.name
            if p.is_symlink():
                out.append(rel)
            elif p.is_dir():
                if pattern.fullmatch(rel + "/"):
                    walk(p, rel + "/")
                else:
                    out.append(rel + "/")
            elif not pattern.fullmatch(rel):
                out.append(rel)

    walk(Path(root), "")
    return out


def foreign_check(owned: Sequence[str]) -> Callable[[Path], list[str]]:
    """The ``foreign`` callback of :func:`usmoe_lp.staging.staged_directory` for these patterns."""
    return lambda path: foreign_entries(path, owned)


def is_router_log(path: Path) -> bool:
    """True when ``path`` looks like a router log directory (a usmoe-lp manifest, or shards)."""
    manifest = path / MANIFEST_NAME
    if manifest.is_file():
        try:
            with manifest.open("rb") as fh:
                head = fh.read(1 << 16)
        except OSError:
            return True  # unreadable: do not risk writing into it
        if FORMAT_NAME.encode() in head:
            return True
    shards = path / SHARDS_DIR
    return shards.is_dir() and any(SHARD_FILE_RE.match(f"{SHARDS_DIR}/{p.name.removesuffix(TMP_SUFFIX)}")
                                   for p in shards.iterdir())


def check_report_location(out: str | os.PathLike, *, what: str, inputs: Sequence[str | os.PathLike] = (),
                          out_flag: str = "out") -> None:
    """Refuse an ``out`` that is (or lies inside) a router log, or that contains one of ``inputs``.

    Writing a report into a router log would mix files into the log (and replacing the report would
    then delete the log's files); replacing an ``out`` that holds the run's own input would delete it.
    ``out_flag`` is how the caller's interface names the output (``--out`` on the command line).
    """
    given = Path(out)
    out = given.absolute().resolve()
    for d in (out, *out.parents):
        if d.is_dir() and is_router_log(d):
            where = "is" if d == out else f"lies inside {d}, which is"
            raise OutputExists(f"{out_flag} {given} {where} a router log; write the {what} outside the log "
                               "directory")
    for src in inputs:
        resolved = Path(src).absolute().resolve()
        if resolved == out or out in resolved.parents:
            raise OutputExists(f"{out_flag} {given} contains the input {src}; replacing the {what} there would "
                               "delete it: choose another directory")
