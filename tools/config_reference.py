"""Print the config reference (every key, its default and its docstring) as a Markdown table.

docs/config.md holds this output; tests/test_readme.py checks that it
is up to date, so a new option cannot land undocumented.
    python tools/config_reference.py
"""

from __future__ import annotations

import ast
import dataclasses
import inspect

from hrvit import config


def field_docs(cls) -> dict[str, str]:
    """Docstrings written under each dataclass field, read from the source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def reference() -> str:
    rows = ["| key | default | meaning |", "|---|---|---|"]
    top = field_docs(config.Config)
    for section in dataclasses.fields(config.Config):
        if section.default is not dataclasses.MISSING:  # a top-level key, not a section
            rows.append(f"| `{section.name}` | `{section.default!r}` | {top.get(section.name, '')} |")
            continue
        cls = section.default_factory
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = "null" if default is None else repr(default).replace("|", "\\|")
            rows.append(f"| `{section.name}.{f.name}` | `{shown}` | {docs.get(f.name, '')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(reference())
