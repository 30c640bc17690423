"""MkDocs hook: the configuration reference, generated from the config dataclasses and their attribute docstrings.

Every field of :class:`moebsr.config.RunConfig`, walked recursively, becomes one table row (key as
``section.field``, type, default, docstring) in the page that holds :data:`MARKER`. The docstrings are the string
literals written on the line after each field (the convention griffe, mkdocstrings and Sphinx read), found with
``ast`` in the source of the class that declares the field, so inherited fields (``MoESpec``'s in ``moe``) keep
theirs. Nothing here imports torch.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import sys
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- config-reference -->"


def _run_config() -> type:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from moebsr.config import RunConfig

    return RunConfig


@functools.cache
def _declared_docstrings(cls: type) -> dict[str, str]:
    """Field name -> attribute docstring for the fields ``cls`` itself declares (not inherited ones)."""
    tree = ast.parse(Path(inspect.getsourcefile(cls)).read_text(encoding="utf-8"))
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    found: dict[str, str] = {}
    for statement, following in zip(node.body, [*node.body[1:], None]):
        if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
            continue
        if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant) \
                and isinstance(following.value.value, str):
            found[statement.target.id] = " ".join(inspect.cleandoc(following.value.value).split())
    return found


def field_docstrings(cls: type) -> dict[str, str]:
    """Field name -> docstring for every field of the dataclass ``cls``, inherited ones included ('' if none)."""
    docstrings: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docstrings.update(_declared_docstrings(klass))
    return {f.name: docstrings.get(f.name, "") for f in dataclasses.fields(cls)}


class Row(NamedTuple):
    key: str
    type: str
    default: Any
    doc: str


class Section(NamedTuple):
    name: str
    doc: str
    rows: list[Row]


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def sections(root: type | None = None) -> list[Section]:
    """The config as sections: the top-level keys first, then one section per nested dataclass, depth first."""
    root = root or _run_config()
    found: list[Section] = []

    def walk(cls: type, prefix: str, doc: str) -> None:
        section = Section(prefix.rstrip(".") or "top level", doc, [])
        found.append(section)
        nested = []
        docstrings = field_docstrings(cls)
        for field in dataclasses.fields(cls):
            default = _default(field)
            if dataclasses.is_dataclass(default):
                nested.append((type(default), f"{prefix}{field.name}.", docstrings[field.name]))
            else:
                section.rows.append(Row(f"{prefix}{field.name}", str(field.type), default, docstrings[field.name]))
        for cls_, prefix_, doc_ in nested:
            walk(cls_, prefix_, doc_)

    walk(root, "", inspect.cleandoc(root.__doc__ or ""))
    return [section for section in found if section.rows]


def all_keys(root: type | None = None) -> list[str]:
    return [row.key for section in sections(root) for row in section.rows]


def _yaml(value: Any) -> str:
    """A default as it is written in a YAML config."""
    if value is dataclasses.MISSING:
        return "(required)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_yaml(item)}" for key, item in value.items()) + "}"
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render(root: type | None = None) -> str:
    """The reference as Markdown: one table per section."""
    out = []
    for section in sections(root):
        out.append(f"### `{section.name}`\n" if section.name != "top level" else "### Top level\n")
        if section.doc:
            out.append(section.doc + "\n")
        out.append("| key | type | default | what it does |\n|---|---|---|---|")
        for row in section.rows:
            out.append(f"| `{row.key}` | `{_cell(row.type)}` | `{_cell(_yaml(row.default))}` | {_cell(row.doc)} |")
        out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render())
