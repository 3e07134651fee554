"""What a report directory may hold, where it may go, and how its PNGs are saved (byte-stable).

Every report directory (verify, analyze, the demo) is written through
:func:`usmoe_lp.staging.staged_directory`: built aside, swapped in only on success. To replace an
earlier report the caller must allow it (``overwrite``) and the directory must hold nothing but what
that kind of report writes; :func:`usmoe_lp.staging.foreign_entries` lists the rest against the report's *owned*
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
from collections.abc import Sequence
from pathlib import Path

from usmoe_lp.errors import OutputExists
from usmoe_lp.logs.format import (
    FORMAT_NAME,
    MANIFEST_NAME,
    ROUTER_LOG_OWNED,
    SHARD_FILE_RE,
    SHARDS_DIR,
    TMP_SUFFIX,
)
from usmoe_lp.staging import foreign_check, foreign_entries, prefixed

# the owned-pattern helpers live in usmoe_lp.staging, what a router log holds in usmoe_lp.logs.format;
# the reports read them from here
__all__ = ["PNG_METADATA", "ROUTER_LOG_OWNED", "check_report_location", "foreign_check", "foreign_entries",
           "is_router_log", "prefixed", "save_png"]

PNG_METADATA = {"Software": None}
"""savefig metadata of every report PNG: no matplotlib version (nor date) in the file, so equal
figures give equal bytes."""


def save_png(fig, target, *, dpi: int) -> None:
    """``fig.savefig`` as PNG with :data:`PNG_METADATA` (``target``: a path or a binary file object)."""
    fig.savefig(target, format="png", dpi=dpi, metadata=PNG_METADATA)


def write_figures(figures, out: Path, *, dpi: int = 120) -> dict[str, bytes]:
    """Write each ``{file name: matplotlib Figure}`` as a PNG into ``out`` (each figure closed afterwards, also on
    error); returns ``{file name: PNG bytes}`` for the reports that inline them."""
    import io

    import matplotlib.pyplot as plt

    pngs: dict[str, bytes] = {}
    for name, fig in figures.items():
        buf = io.BytesIO()
        try:
            save_png(fig, buf, dpi=dpi)
        finally:
            plt.close(fig)
        pngs[name] = buf.getvalue()
        (out / name).write_bytes(pngs[name])
    return pngs


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
