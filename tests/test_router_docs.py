"""docs/routers.md is generated from the router registry by tools/router_docs.py and must be up to date."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from usmoe_lp.routers import ROUTERS, list_routers

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "routers.md"


def _tool():
    spec = importlib.util.spec_from_file_location("router_docs", ROOT / "tools" / "router_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_router_page_is_up_to_date():
    tool = _tool()
    expected = tool.render()
    current = PAGE.read_text(encoding="utf-8") if PAGE.is_file() else ""
    assert current == expected, (f"docs/routers.md is out of date with the router registry; regenerate it with "
                                 f"`{tool.COMMAND}` and commit it")


def test_router_page_has_a_section_per_registry_router_with_its_facts():
    text = PAGE.read_text(encoding="utf-8")
    sections = re.findall(r"^## (\S+)$", text, flags=re.M)
    assert sections == list(list_routers()), "regenerate docs/routers.md: " + _tool().COMMAND
    for name, entry in ROUTERS.items():
        body = text.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]
        assert entry.reference in body and f"`{entry.prefix}`" in body and entry.decode in body, name
        assert ("Exact:" if entry.exact else "Heuristic:") in body, name
        for p in entry.params:
            assert f"| `{p.name}` | {p.kind.__name__} |" in body, (name, p.name)


def test_the_check_mode_sees_a_stale_page(tmp_path, monkeypatch, capsys):
    tool = _tool()
    stale = tmp_path / "routers.md"
    stale.write_text(tool.render().replace("## tc\n", "## tc_renamed\n"))
    monkeypatch.setattr(tool, "PAGE", stale)
    monkeypatch.setattr(tool, "ROOT", tmp_path)
    assert tool.main(["--check"]) == 1
    assert "tools/router_docs.py" in capsys.readouterr().err
    stale.write_text(tool.render())
    assert tool.main(["--check"]) == 0


def test_readme_points_to_the_generated_router_page():
    """The README names no router list of its own that could go stale: it links the generated page."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Routers\n", 1)[1].split("\n## ", 1)[0]
    assert "(docs/routers.md)" in section and "tools/router_docs.py" in section
    assert not re.search(r"^\| `\w+` \|", section, flags=re.M), "a hand-kept router table in README.md"
