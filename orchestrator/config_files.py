"""Reading config files: ``extends`` chains (each parent relative to its child; mappings merge
recursively, everything else replaces) and pydantic's validation errors in the words of the file
(the dotted key, the value, what is allowed). The schema itself is :mod:`orchestrator.config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from models.errors import UserError


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` on ``base``: mappings merge recursively, everything else replaces."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: Path, config_dir: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping of the YAML file ``path`` with its ``extends`` chain merged in (each
    parent relative to its child); a ``UserError`` names the file for a missing file, invalid
    YAML, a non-mapping top level or a cycle (``config_dir``: the shipped configs, named when
    the file is missing)."""
    if path in seen:
        raise UserError(f"{path}: 'extends' forms a cycle: {' -> '.join(map(str, seen))}")
    if not path.is_file():
        raise UserError(
            f"config file {path} not found; the shipped ones are in {config_dir} "
            f"({', '.join(sorted(p.name for p in config_dir.glob('*.yaml')))})"
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise UserError(
            f"{path}: the top level must be a mapping of keys, got {type(data).__name__}"
        )
    parent = data.pop("extends", None)
    if parent is None:
        return data
    return merge(read_yaml(path.parent / str(parent), config_dir, (*seen, path)), data)


def section_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The config section (a model class) at ``loc`` under ``root``, or None for a leaf."""
    section: type[BaseModel] = root
    for part in loc:
        field = section.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        section = annotation
    return section


def describe_error(root: type[BaseModel], error: Any) -> str:
    """One pydantic error of a ``root`` config in the words of the file: the dotted key, what
    was wrong, and for an unknown key the keys allowed there."""
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        section = section_at(root, tuple(error["loc"][:-1]))
        allowed = f"; allowed here: {', '.join(section.model_fields)}" if section else ""
        return f"unknown key {key!r}{allowed}"
    if error["type"] == "value_error":
        where = "" if key == "(top level)" else f"key {key!r}: "
        return where + error["msg"].removeprefix("Value error, ")
    if error["type"] == "literal_error":
        return f"key {key!r}: got {error['input']!r}, allowed: {error['ctx']['expected']}"
    return f"key {key!r}: {error['msg']} (got {error['input']!r})"
