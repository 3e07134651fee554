"""One text, two renderings: the blocks of a report written once and rendered as Markdown and as HTML.

A report is a list of blocks (:class:`Heading`, :class:`Paragraph`, :class:`Bullets`, :class:`Table`,
:class:`Figure`, :class:`Code`) whose text uses a small inline Markdown: ``code``, ``**bold**`` and
``[text](link)``. :func:`render_markdown` writes report.md from the blocks as they are; :func:`render_html`
writes report.html from the same blocks, the inline Markdown rendered (:func:`inline_html`), so the two files
say the same thing and the HTML shows no Markdown syntax.

Wide tables: a :class:`Table` may name column ``groups``; each group is rendered as its own table (the key
column repeated), so a table of many columns fits a 1280 px page instead of running off its right edge.

>>> inline_html("Source: `router-log` ([docs](docs/a.md)) is **fine** & <ok>")
"Source: <code>router-log</code> (<a href='docs/a.md'>docs</a>) is <strong>fine</strong> &amp; &lt;ok&gt;"
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

__all__ = ["BASE_STYLE", "Bullets", "Code", "Figure", "Heading", "Paragraph", "Table", "column_groups", "figure_html",
           "html_table", "inline_html", "list_text", "md_table", "render_html", "render_markdown"]

BASE_STYLE = ("body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222;"
              "line-height:1.4}table{border-collapse:collapse;font-size:13px;margin:1em 0}"
              "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f3f3f3;"
              "vertical-align:bottom}td:first-child,th:first-child{text-align:left;white-space:nowrap}"
              "img{max-width:100%;border:1px solid #eee;margin:.5em 0}figure{margin:1em 0}"
              "figcaption{color:#555;font-size:13px}code{background:#f5f5f5;padding:0 2px}"
              "pre{background:#f5f5f5;padding:.5em;white-space:pre-wrap;overflow-wrap:anywhere}"
              "p.table-title{margin:1em 0 -.5em;font-size:13px;color:#555}")
"""The stylesheet of every HTML report (inline: the pages load nothing). The first column of a table (a label
or a layer name) never wraps; headers wrap at underscores (:func:`html_table`)."""


@dataclass(frozen=True)
class Heading:
    """A section heading; ``level`` 1 (the title) to 3."""

    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    """A paragraph of inline-Markdown text."""

    text: str


@dataclass(frozen=True)
class Bullets:
    """A list of inline-Markdown items (numbered when ``ordered``)."""

    items: tuple[str, ...]
    ordered: bool = False


@dataclass(frozen=True)
class Code:
    """A line (or lines) of literal text, e.g. a command."""

    text: str


@dataclass(frozen=True)
class Table:
    """A frame rendered as one table, or as one table per column group.

    ``groups``: (title, columns) pairs; each group becomes a table of the key column (the frame's first) and those
    columns (columns of no group follow in a last table). ``digits``: significant digits of floats."""

    frame: pd.DataFrame = field(compare=False)
    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()
    digits: int = 4


@dataclass(frozen=True)
class Figure:
    """A PNG figure: its file ``name`` (linked from Markdown), its bytes (inlined in HTML), a caption and an
    optional note (both inline Markdown)."""

    name: str
    data: bytes = field(repr=False)
    caption: str
    note: str = ""


Block = Heading | Paragraph | Bullets | Code | Table | Figure

_CODE = re.compile(r"`([^`]+)`")
_LINK = re.compile(r"\[([^\]\n]+)\]\(([^)\s]+)\)")
_BOLD = re.compile(r"\*\*([^*]+)\*\*")


def inline_html(text: str) -> str:
    """HTML of one inline-Markdown string: ``code`` -> <code>, ``**b**`` -> <strong>, ``[t](url)`` -> <a>; the rest
    escaped. Text inside code spans is shown literally (no bold or links inside)."""
    out, pos = [], 0
    for m in _CODE.finditer(text):
        out.append(_inline_plain(text[pos:m.start()]))
        out.append(f"<code>{html.escape(m.group(1))}</code>")
        pos = m.end()
    out.append(_inline_plain(text[pos:]))
    return "".join(out)


def _inline_plain(text: str) -> str:
    s = html.escape(text)
    s = _LINK.sub(lambda m: f"<a href='{m.group(2)}'>{m.group(1)}</a>", s)
    return _BOLD.sub(r"<strong>\1</strong>", s)


def list_text(values: Sequence) -> str:
    """Values as a reader writes them: ``sequence, batch`` (numbers with ``%g``), never a Python repr.

    >>> list_text(["sequence", "batch"]), list_text((0.5, 1, 1.5)), list_text([])
    ('sequence, batch', '0.5, 1, 1.5', '')
    """
    return ", ".join(f"{v:g}" if isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)
                     else str(v) for v in values)


def _fmt(v, digits: int) -> str:
    if v is None or (isinstance(v, float | np.floating) and not np.isfinite(v)):
        return "–"
    if isinstance(v, float | np.floating):
        return f"{v:.{digits}g}"
    return str(v)


def column_groups(frame: pd.DataFrame,
                  groups: Sequence[tuple[str, Sequence[str]]] = ()) -> list[tuple[str, pd.DataFrame]]:
    """The frame cut into (title, sub-frame) pairs: one per group (its columns present in the frame, after the key
    column, the frame's first), then the columns of no group; without groups, the frame itself (title '')."""
    if not groups or frame.shape[1] <= 1:
        return [("", frame)]
    key = frame.columns[0]
    out, used = [], {key}
    for title, cols in groups:
        present = [c for c in cols if c in frame.columns and c not in used]
        if present:
            out.append((title, frame[[key, *present]]))
            used.update(present)
    rest = [c for c in frame.columns if c not in used]
    if rest:
        out.append(("other columns", frame[[key, *rest]]))
    return out


def md_table(frame: pd.DataFrame, digits: int = 4) -> str:
    """A Markdown table of ``frame`` (floats to ``digits`` significant digits, NaN/None as –)."""
    if frame.empty:
        return "_(none)_\n"
    head = "| " + " | ".join(map(str, frame.columns)) + " |\n|" + "---|" * len(frame.columns) + "\n"
    body = "".join("| " + " | ".join(_fmt(v, digits) for v in row) + " |\n" for row in frame.itertuples(index=False))
    return head + body


def _cell_html(v, digits: int) -> str:
    return inline_html(v) if isinstance(v, str) else html.escape(_fmt(v, digits))


def html_table(frame: pd.DataFrame, digits: int = 4) -> str:
    """An HTML table of ``frame``; headers may wrap after an underscore (``<wbr>``), values never do. Text cells
    are inline Markdown (``code``, ``**bold**``, links), as in :func:`md_table`."""
    if frame.empty:
        return "<p>(none)</p>"
    head = "".join(f"<th>{html.escape(str(c)).replace('_', '_<wbr>')}</th>" for c in frame.columns)
    rows = "".join("<tr>" + "".join(f"<td>{_cell_html(v, digits)}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def render_markdown(blocks: Sequence[Block]) -> str:
    """report.md of the blocks."""
    lines: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            lines += [f"{'#' * b.level} {b.text}", ""]
        elif isinstance(b, Paragraph):
            lines += [b.text, ""]
        elif isinstance(b, Bullets):
            lines += [f"{i}. {s}" if b.ordered else f"- {s}" for i, s in enumerate(b.items, 1)] + [""]
        elif isinstance(b, Code):
            lines += [f"    {line}" for line in b.text.splitlines()] + [""]
        elif isinstance(b, Table):
            for title, sub in column_groups(b.frame, b.groups):
                lines += ([f"_{title}_", ""] if title else []) + [md_table(sub, b.digits)]
        elif isinstance(b, Figure):
            lines += [f"![{b.caption}]({b.name})", "", b.caption, ""] + ([b.note, ""] if b.note else [])
        else:
            raise TypeError(f"not a report block: {b!r}")
    return "\n".join(lines).rstrip("\n") + "\n"


def figure_html(data: bytes, caption: str, name: str | None = None, note: str = "") -> str:
    """An HTML figure with the PNG ``data`` inlined as base64 (the page loads nothing); caption and note are
    inline Markdown."""
    b64 = base64.b64encode(data).decode("ascii")
    alt = html.escape(_CODE.sub(r"\1", caption), quote=True)
    suffix = f" ({html.escape(name)})" if name else ""
    extra = f"<br>{inline_html(note)}" if note else ""
    return (f"<figure><img alt=\"{alt}\" src='data:image/png;base64,{b64}'>"
            f"<figcaption>{inline_html(caption)}{suffix}{extra}</figcaption></figure>")


def render_html(blocks: Sequence[Block], *, title: str, style: str = BASE_STYLE,
                figure: Callable[[Figure], str] | None = None) -> str:
    """A self-contained report.html of the blocks (figures inlined). ``figure``: how a :class:`Figure` is written
    (default: :func:`figure_html`, the PNG bytes inlined)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{style}</style></head><body>"]
    for b in blocks:
        if isinstance(b, Heading):
            parts.append(f"<h{b.level}>{inline_html(b.text)}</h{b.level}>")
        elif isinstance(b, Paragraph):
            parts.append(f"<p>{inline_html(b.text)}</p>")
        elif isinstance(b, Bullets):
            tag = "ol" if b.ordered else "ul"
            parts.append(f"<{tag}>" + "".join(f"<li>{inline_html(s)}</li>" for s in b.items) + f"</{tag}>")
        elif isinstance(b, Code):
            parts.append(f"<pre><code>{html.escape(b.text)}</code></pre>")
        elif isinstance(b, Table):
            for sub_title, sub in column_groups(b.frame, b.groups):
                if sub_title:
                    parts.append(f"<p class='table-title'>{inline_html(sub_title)}</p>")
                parts.append(html_table(sub, b.digits))
        elif isinstance(b, Figure):
            parts.append(figure(b) if figure is not None else figure_html(b.data, b.caption, b.name, b.note))
        else:
            raise TypeError(f"not a report block: {b!r}")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
