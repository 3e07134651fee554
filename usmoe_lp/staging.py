"""Output directories that are built aside and swapped in only on success.

Every command that writes a directory (a router log, a verify or analyze report, the demo) goes
through :func:`staged_directory`: the new content is written into a hidden temporary sibling of the
destination, and only when the whole run succeeded is it renamed into place. A run that fails or is
interrupted leaves the destination exactly as it was (the previous report, the previous log, the
user's files) and removes only the temporary directory it created itself. An existing destination is
replaced only when the caller allows it (``overwrite``) and only when it holds nothing but what an
earlier run of the same kind wrote: the caller says which entries those are.

>>> import tempfile, pathlib
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> with staged_directory(root / "report", what="report") as tmp:
...     _ = (tmp / "a.txt").write_text("first")
>>> sorted(p.name for p in root.iterdir())
['report']
>>> try:
...     with staged_directory(root / "report", what="report", overwrite=True, foreign=lambda d: []) as tmp:
...         _ = (tmp / "a.txt").write_text("second")
...         raise RuntimeError("the run failed")
... except RuntimeError:
...     pass
>>> (root / "report" / "a.txt").read_text(), sorted(p.name for p in root.iterdir())
('first', ['report'])
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from usmoe_lp.errors import OutputExists

STAGING_PREFIX = "."
STAGING_MARK = ".partial-"
RETIRED_MARK = ".replaced-"


def _entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def check_destination(final: str | os.PathLike, *, what: str, overwrite: bool = False,
                      foreign: Callable[[Path], list[str]] | None = None,
                      overwrite_flag: str = "overwrite=True", error: type[OutputExists] = OutputExists) -> bool:
    """Raise :class:`OutputExists` unless ``final`` may receive a new ``what``; True when it exists non-empty.

    ``final`` may be missing or an empty directory. A non-empty directory needs ``overwrite`` and a
    ``foreign(path) -> list[str]`` that lists the entries no earlier run of this kind wrote (an empty
    list: everything there may be replaced). ``overwrite_flag`` is how the caller's interface spells
    the option (``--overwrite`` on the command line), used in the message; ``error`` is the
    :class:`OutputExists` subclass to raise.
    """
    final = Path(final)
    if final.is_symlink():
        raise error(f"{final} is a symbolic link; choose a real directory for the {what}")
    if final.exists() and not final.is_dir():
        raise error(f"{final} exists and is not a directory; choose another path for the {what}")
    for parent in final.parents:
        if parent.exists() and not parent.is_dir():
            raise error(f"{parent} is a file, so {final} cannot be created; choose another path for the "
                               f"{what}")
    if not final.exists():
        return False
    try:
        entries = _entries(final)
    except PermissionError:
        raise error(f"{final} cannot be read (permission denied); choose another path for the {what}") from None
    if not entries:
        return False
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    if not overwrite:
        raise error(f"{final} is not empty ({shown}); refusing to overwrite it: choose another directory "
                           f"or pass {overwrite_flag} to replace an earlier {what}")
    extra = sorted(foreign(final)) if foreign is not None else entries
    if extra:
        raise error(f"{final} holds files that no earlier {what} wrote ({', '.join(extra[:5])}"
                           f"{', ...' if len(extra) > 5 else ''}); refusing to delete them even with "
                           f"{overwrite_flag}: choose another directory")
    return True


def staging_path(final: str | os.PathLike) -> Path:
    """A fresh hidden sibling of ``final`` to build it in (not created)."""
    final = Path(final)
    return final.with_name(f"{STAGING_PREFIX}{final.name}{STAGING_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def swap_in(tmp: Path, final: Path) -> None:
    """Move the finished directory ``tmp`` to ``final``, retiring what was there (a checked earlier output).

    The old content is renamed aside first and deleted only after the new one is in place, so at
    every instant ``final`` holds either the complete old or the complete new directory.
    """
    retired = None
    if final.exists():
        if not any(final.iterdir()):
            final.rmdir()
        else:
            retired = final.with_name(f"{STAGING_PREFIX}{final.name}{RETIRED_MARK}{os.getpid()}-"
                                      f"{secrets.token_hex(4)}")
            os.rename(final, retired)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that a rename inside it survives a power cut (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def staged_directory(final: str | os.PathLike, *, what: str, overwrite: bool = False,
                     foreign: Callable[[Path], list[str]] | None = None,
                     overwrite_flag: str = "overwrite=True",
                     error: type[OutputExists] = OutputExists) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``final``; on success it becomes ``final``, on error it is removed.

    The destination is checked up front (:func:`check_destination`), before any work is done, and
    again implicitly by the swap. Parents of ``final`` are created as needed.
    """
    final = Path(final)
    check_destination(final, what=what, overwrite=overwrite, foreign=foreign, overwrite_flag=overwrite_flag,
                      error=error)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = staging_path(final)
        tmp.mkdir()
    except OSError as exc:
        raise error(f"cannot write the {what} next to {final}: {exc.strerror or exc}") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    check_destination(final, what=what, overwrite=overwrite, foreign=foreign, overwrite_flag=overwrite_flag,
                      error=error)
    swap_in(tmp, final)


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
    """The ``foreign`` callback of :func:`staged_directory` for these patterns."""
    return lambda path: foreign_entries(path, owned)
