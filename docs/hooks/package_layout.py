"""MkDocs hook: the package layout, generated from the modules themselves so that it cannot go stale.

Where a page holds :data:`MARKER`, one table per package of ``moebsr/`` is written: each module and the first
sentence of its docstring (read with ``ast``; nothing is imported).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "moebsr"
MARKER = "<!-- package-layout -->"


def summary(path: Path) -> str:
    """The first sentence of a module's docstring ('' without one)."""
    docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    paragraph = " ".join(docstring.split("\n\n")[0].split())
    end = paragraph.find(". ")
    return (paragraph if end < 0 else paragraph[:end + 1]).replace("|", "\\|")


def layout() -> str:
    packages = [PACKAGE, *sorted(path.parent for path in PACKAGE.glob("*/__init__.py"))]
    out = []
    for package in packages:
        name = package.relative_to(ROOT).as_posix()
        out += [f"#### `{name}/`", "", summary(package / "__init__.py"), "", "| module | what it holds |", "|---|---|"]
        for module in sorted(package.glob("*.py")):
            if module.name != "__init__.py":
                out.append(f"| `{module.name}` | {summary(module)} |")
        out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return markdown.replace(MARKER, layout()) if MARKER in markdown else markdown
