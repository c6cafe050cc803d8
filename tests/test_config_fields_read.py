"""Every `RunConfig` field is read somewhere outside the schema: a field no code reads is a
setting that silently does nothing (the house rule: every key changes behaviour or does not
exist). Reads are attribute accesses (`cfg.train.micro_batch`, `t.micro_batch`) or
`getattr(x, "name")` anywhere in the package, found with Python's own parser."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

from megatron_internvl.config import schema

PACKAGE = Path(schema.__file__).resolve().parents[1]


def _names_read(files: list[Path]) -> set[str]:
    names: set[str] = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                names.add(node.attr)
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "getattr"
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
            ):
                names.add(node.args[1].value)
    return names


def _fields(cls: type, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, attribute name) of every leaf field of the schema."""
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory) if callable(f.default_factory) else False:
            out += _fields(f.default_factory, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", f.name))
    return out


def unread_fields(files: list[Path], extra: tuple[str, ...] = ()) -> list[str]:
    read = _names_read(files)
    keys = [*_fields(schema.RunConfig), *((name, name.split(".")[-1]) for name in extra)]
    return [key for key, attr in keys if attr not in read]


def test_every_schema_field_is_read_by_the_package():
    files = [p for p in PACKAGE.rglob("*.py") if p.resolve() != Path(schema.__file__).resolve()]
    assert len(_fields(schema.RunConfig)) > 40
    assert unread_fields(files) == []
    # The check can fail: a field that no module reads is reported.
    assert unread_fields(files, ("train.unused_new_setting",)) == ["train.unused_new_setting"]
