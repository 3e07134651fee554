"""Render every report.html under a directory in headless Chromium, screenshot it, and check it mechanically.

    .venv/bin/python tools/report_check.py out                  # every out/**/report.html
    .venv/bin/python tools/report_check.py out --shots out/report-check
    make report-check                                           # builds out/demo first when it is missing

For each page (demo, analyze, verify, evaluate, compare: whatever report.html lies under the directory) it

* loads the page at 1280 px wide in headless Chromium (``/usr/bin/chromium``) and writes PNG screenshots of the
  whole page under ``--shots`` (one file, or tiles of one viewport height each when the page is very tall);
* measures, in the browser, the document's scroll width (no horizontal overflow: at most 1280 px), every element
  that reaches past the right edge, every table cell whose text wraps onto more than :data:`MAX_CELL_LINES` lines,
  and every ``<img>`` that did not load;
* checks the rendered text (``document.body.innerText``) for Markdown that was not rendered (backticks, ``**``,
  ``[text](link)``, ``![``) and Python reprs of lists, tuples or dicts (``['sequence', 'batch']``)
  (:func:`markdown_leaks`);
* checks that every relative link of the page points at a file that exists.

It exits 1 naming each problem (``page: problem``), 2 when Chromium is missing or fails, 0 when every page passes.

How the measurement leaves the browser: a probe copy of the page (in the screenshot directory, with a ``<base>``
pointing at the report's own directory, so the report directory gets no foreign file) carries a script that, on
``load``, writes the measurements as JSON into a ``<pre>`` element; ``chromium --dump-dom`` (with a virtual-time
budget, so the images have decoded) prints the DOM, and the JSON is read back from it.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

WIDTH = 1280
"""Window width of every check and screenshot, px."""
VIEWPORT = 900
"""Viewport height, px: the height of a tile of a tall page."""
TALL = 6 * VIEWPORT
"""Pages taller than this are cut into tiles of :data:`VIEWPORT` px (one screenshot file otherwise)."""
MAX_SHOT = 16000
"""The tallest window Chromium is asked to render at once; a longer page's tail is shot by scrolling."""
MAX_CELL_LINES = 3
"""A table cell whose text wraps onto more lines than this is a problem (a label broken into pieces)."""
CHROMIUM = "/usr/bin/chromium"
INSTALL_HINT = "install it with: apt-get install chromium"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage",
         "--hide-scrollbars", "--allow-file-access-from-files", "--force-device-scale-factor=1")
RESULT_ID = "report-check-result"

PROBE = """<script>
window.addEventListener('load', function () {
  var W = %(width)d, out = {};
  var de = document.documentElement;
  out.scrollWidth = Math.max(de.scrollWidth, document.body ? document.body.scrollWidth : 0);
  out.scrollHeight = Math.max(de.scrollHeight, document.body ? document.body.scrollHeight : 0);
  function name(el) {
    var t = (el.innerText || el.alt || '').replace(/\\s+/g, ' ').trim().slice(0, 60);
    return el.tagName.toLowerCase() + (t ? ' "' + t + '"' : '');
  }
  function clipped(el) {  // inside a horizontally scrollable container: its overflow is intended
    for (var p = el.parentElement; p && p !== document.body; p = p.parentElement) {
      var ox = getComputedStyle(p).overflowX;
      if (ox === 'auto' || ox === 'scroll' || ox === 'hidden') return true;
    }
    return false;
  }
  out.overflow = [];
  var all = document.body ? document.body.querySelectorAll('*') : [];
  for (var i = 0; i < all.length; i++) {
    var el = all[i], r = el.getBoundingClientRect();
    if (r.width > 0 && r.right > W + 0.5 && !clipped(el)) {
      var parent = el.parentElement, pr = parent ? parent.getBoundingClientRect() : null;
      if (!pr || pr.right <= W + 0.5 || parent === document.body)
        out.overflow.push(name(el) + ' reaches ' + Math.round(r.right) + ' px');
    }
  }
  out.wrapped = [];
  var cells = document.querySelectorAll('td, th');
  for (var j = 0; j < cells.length; j++) {
    var c = cells[j], s = getComputedStyle(c);
    var lh = parseFloat(s.lineHeight) || 1.2 * parseFloat(s.fontSize);
    var h = c.clientHeight - parseFloat(s.paddingTop) - parseFloat(s.paddingBottom);
    var lines = Math.round(h / lh);
    if (lines > %(max_lines)d && c.innerText.trim()) out.wrapped.push(name(c) + ' wraps onto ' + lines + ' lines');
  }
  out.images = [];
  for (var k = 0; k < document.images.length; k++) {
    var im = document.images[k];
    out.images.push({src: (im.getAttribute('src') || '').slice(0, 80), alt: im.alt || '',
                     loaded: im.complete && im.naturalWidth > 0});
  }
  out.text = document.body ? document.body.innerText : '';
  var pre = document.createElement('pre');
  pre.id = '%(result_id)s';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


class ChromiumMissing(RuntimeError):
    """No Chromium executable where the check looks for it."""


@dataclass(frozen=True)
class PageCheck:
    """The outcome of one page: its path, the screenshots written, the page's size (px) and the problems found
    (one sentence each; empty when the page passes)."""

    page: Path
    shots: tuple[Path, ...]
    width: int
    height: int
    problems: tuple[str, ...]


# ------------------------------------------------------------------------------------------------ text checks
LEAK_PATTERNS: tuple[tuple[str, re.Pattern], ...] = (
    ("backtick (unrendered inline code)", re.compile(r"`[^`\n]{1,80}`|`")),
    ("** (unrendered bold)", re.compile(r"\*\*")),
    ("![ (unrendered Markdown image)", re.compile(r"!\[")),
    ("[text](link) (unrendered Markdown link)", re.compile(r"\[[^\]\n]+\]\([^)\s]+\)")),
    ("Python list/tuple repr", re.compile(r"[\[(]\s*(?:'[^'\n]*'|\"[^\"\n]*\")\s*[,\])]")),
    ("Python dict repr", re.compile(r"\{\s*'[^'\n]*'\s*:")),
)
"""What :func:`markdown_leaks` looks for in a page's rendered text: description, pattern."""


def markdown_leaks(text: str) -> list[str]:
    """Every piece of Markdown syntax or Python repr left in rendered ``text`` (a page's ``innerText``): one line
    per occurrence, ``what: "...context..."``.

    >>> for line in markdown_leaks("Source: `out/demo`, scopes ['sequence', 'batch'], see [docs](a.md)"):
    ...     print(line)
    backtick (unrendered inline code): "Source: `out/demo`, scopes ['sequence'"
    [text](link) (unrendered Markdown link): "nce', 'batch'], see [docs](a.md)"
    Python list/tuple repr: "`out/demo`, scopes ['sequence', 'batch'], see [docs"
    >>> markdown_leaks("sequence, batch; k-bar 1.5 [experts per token] (a) [b]")
    []
    """
    out = []
    for what, pattern in LEAK_PATTERNS:
        for m in pattern.finditer(text):
            a, b = max(0, m.start() - 20), min(len(text), m.end() + 20)
            context = " ".join(text[a:b].split())
            out.append(f'{what}: "{context}"')
    return out


def broken_links(page: Path, source: str) -> list[str]:
    """Relative ``href``/``src`` targets of the HTML ``source`` (of the file ``page``) that do not exist."""
    out = []
    for ref in re.findall(r"""(?:href|src)\s*=\s*['"]([^'"]+)['"]""", source):
        parts = urlsplit(html.unescape(ref))
        if parts.scheme or parts.netloc or not parts.path or ref.startswith("#"):
            continue
        target = (page.parent / unquote(parts.path)).resolve()
        if not target.exists():
            out.append(f"link to a missing file: {ref}")
    return out


# ------------------------------------------------------------------------------------------------ browser
def find_chromium(path: str | None = None) -> str:
    """The Chromium executable: ``path`` when given (it must exist), else /usr/bin/chromium, else ``chromium`` on
    PATH. Raises :class:`ChromiumMissing` (with the apt-get command) when there is none."""
    candidates = (path,) if path else (CHROMIUM, shutil.which("chromium"), shutil.which("chromium-browser"))
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    raise ChromiumMissing(f"Chromium not found ({path or CHROMIUM}); {INSTALL_HINT}")


def _run(chromium: str, args: list[str], *, timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="report-check-profile-") as profile:
        cmd = [chromium, *FLAGS, f"--user-data-dir={profile}", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"chromium exited with {proc.returncode}: {proc.stderr.strip()[-400:]}")
    return proc


def measure(chromium: str, page: Path, probe_dir: Path, *, timeout: float = 60.0) -> dict:
    """Load ``page`` at :data:`WIDTH` px in Chromium and return the probe's measurements (scrollWidth,
    scrollHeight, overflow, wrapped, images, text). The probe copy is written into ``probe_dir``."""
    source = page.read_text(encoding="utf-8")
    base = f"<base href='{page.parent.resolve().as_uri()}/'>"
    probe = PROBE % {"width": WIDTH, "max_lines": MAX_CELL_LINES, "result_id": RESULT_ID}
    head = re.search(r"<head[^>]*>", source, flags=re.IGNORECASE)
    source = (source[:head.end()] + base + source[head.end():]) if head else base + source
    tail = source.lower().rfind("</body>")
    source = source[:tail] + probe + source[tail:] if tail >= 0 else source + probe
    probe_dir.mkdir(parents=True, exist_ok=True)
    probe_file = probe_dir / "probe.html"
    probe_file.write_text(source, encoding="utf-8")
    proc = _run(chromium, [f"--window-size={WIDTH},{VIEWPORT}", "--virtual-time-budget=10000", "--dump-dom",
                           probe_file.resolve().as_uri()], timeout=timeout)
    m = re.search(rf"<pre id=\"{RESULT_ID}\">(.*?)</pre>", proc.stdout, flags=re.DOTALL)
    if m is None:
        raise RuntimeError(f"the probe of {page} wrote no measurement (did the page load?)")
    return json.loads(html.unescape(m.group(1)))


def screenshot(chromium: str, page: Path, shots: Path, height: int, *, timeout: float = 120.0) -> list[Path]:
    """PNG screenshots of the whole of ``page`` (``height`` px tall) at :data:`WIDTH` px into the directory
    ``shots``: ``page.png`` when it is at most :data:`TALL` px, else tiles ``page-01.png``, ... of
    :data:`VIEWPORT` px each. Returns the files written."""
    from PIL import Image

    shots.mkdir(parents=True, exist_ok=True)
    for old in shots.glob("page*.png"):
        old.unlink()
    full = shots / "page.png"
    window = max(VIEWPORT, min(height, MAX_SHOT))
    _run(chromium, [f"--window-size={WIDTH},{window}", "--virtual-time-budget=10000", f"--screenshot={full}",
                    page.resolve().as_uri()], timeout=timeout)
    if height <= TALL:
        return [full]
    tiles = []
    with Image.open(full) as img:
        for i, top in enumerate(range(0, img.height, VIEWPORT), 1):
            tile = shots / f"page-{i:02d}.png"
            img.crop((0, top, img.width, min(img.height, top + VIEWPORT))).save(tile)
            tiles.append(tile)
    full.unlink()
    return tiles


def check_page(chromium: str, page: Path, shots: Path) -> PageCheck:
    """Measure, screenshot and check one report.html; the probe and the screenshots go into ``shots``."""
    m = measure(chromium, page, shots)
    problems = []
    if m["scrollWidth"] > WIDTH:
        problems.append(f"horizontal overflow: the page is {m['scrollWidth']} px wide at a {WIDTH} px window")
    problems += [f"past the right edge: {o}" for o in m["overflow"]]
    problems += [f"table cell {w}" for w in m["wrapped"]]
    problems += [f"image not loaded: {im['alt'] or im['src']}" for im in m["images"] if not im["loaded"]]
    problems += markdown_leaks(m["text"])
    problems += broken_links(page, page.read_text(encoding="utf-8"))
    files = screenshot(chromium, page, shots, int(m["scrollHeight"]))
    (shots / "probe.html").unlink(missing_ok=True)
    return PageCheck(page=page, shots=tuple(files), width=int(m["scrollWidth"]), height=int(m["scrollHeight"]),
                     problems=tuple(problems))


def find_pages(root: Path, *, skip: Path | None = None) -> list[Path]:
    """Every report.html under ``root`` (sorted), none under ``skip``."""
    skip = skip.resolve() if skip is not None else None
    return [p for p in sorted(root.rglob("report.html"))
            if skip is None or skip not in p.resolve().parents]


def shot_dir(shots: Path, root: Path, page: Path) -> Path:
    """Where the screenshots of ``page`` go: its directory relative to ``root``, under ``shots``."""
    rel = page.parent.resolve().relative_to(root.resolve())
    return shots / (rel if str(rel) != "." else Path("root"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", nargs="?", default="out", help="directory searched for report.html (default: out)")
    ap.add_argument("--shots", default=None, help="screenshot directory (default: ROOT/report-check)")
    ap.add_argument("--chromium", default=None, help=f"the Chromium executable (default: {CHROMIUM})")
    args = ap.parse_args(argv)
    root = Path(args.root)
    shots = Path(args.shots) if args.shots else root / "report-check"
    try:
        chromium = find_chromium(args.chromium)
    except ChromiumMissing as exc:
        print(f"report-check: {exc}", file=sys.stderr)
        return 2
    if not root.is_dir():
        print(f"report-check: {root} is not a directory (run `make demo` first)", file=sys.stderr)
        return 2
    pages = find_pages(root, skip=shots)
    if not pages:
        print(f"report-check: no report.html under {root}", file=sys.stderr)
        return 1
    failed = 0
    for page in pages:
        try:
            res = check_page(chromium, page, shot_dir(shots, root, page))
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"{page}: chromium failed: {exc}", file=sys.stderr)
            return 2
        status = "ok" if not res.problems else f"{len(res.problems)} problem(s)"
        print(f"{page}: {res.width} x {res.height} px, {len(res.shots)} screenshot(s) in "
              f"{res.shots[0].parent}: {status}")
        for p in res.problems:
            print(f"  {page}: {p}")
        failed += bool(res.problems)
    print(f"report-check: {len(pages) - failed} of {len(pages)} pages pass")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
