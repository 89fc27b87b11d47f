"""The configuration reference, generated from the config models: every key, its type, default, allowed
values and description, and each preset's value where it differs from the default.

``python launch/pipeline.py --help-config`` prints it; ``--help-config --markdown`` prints the Markdown that
``docs/config.md`` holds (a test compares the two, so the document cannot drift from the code).
"""

from __future__ import annotations

import json
import textwrap
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from runtime.config import PRESETS, RunConfig, preset_tree


@dataclass(frozen=True)
class Entry:
    """One settable key of the configuration."""

    key: str
    type: str
    default: Any
    allowed: str
    description: str


@dataclass(frozen=True)
class Section:
    """A config model reached at ``key`` (``kind`` set where the section is one of several kinds)."""

    key: str
    doc: str
    entries: list[Entry]
    kind: str | None = None
    discriminator: str = "kind"
    """The field that chooses the kind (``kind`` for the quantizer, ``arch`` for the VQ-VAE and the prior)."""


STAGE = "<stage>"
"""Stands for each name of a group of sibling sections of one kind (``cluster.<stage>.time_min``)."""

_BOUNDS = ((annotated_types.Ge, "ge", ">="), (annotated_types.Gt, "gt", ">"), (annotated_types.Le, "le", "<="),
           (annotated_types.Lt, "lt", "<"))


def _strip(annotation: Any) -> tuple[Any, list[Any]]:
    """The bare type of ``Annotated[T, ...]`` and its metadata."""
    metadata: list[Any] = []
    while get_origin(annotation) is typing.Annotated:
        annotation, *extra = get_args(annotation)
        metadata.extend(extra)
    return annotation, metadata


def _union_members(annotation: Any) -> list[Any]:
    if get_origin(annotation) in (Union, types.UnionType):
        return list(get_args(annotation))
    return [annotation]


def _model_members(annotation: Any) -> list[type[BaseModel]] | None:
    """The config models a field holds (one, or the kinds of a union), None for a plain value."""
    members = [_strip(m)[0] for m in _union_members(_strip(annotation)[0])]
    if all(isinstance(m, type) and issubclass(m, BaseModel) for m in members):
        return members
    return None


def _constraints(metadata: list[Any]) -> list[str]:
    out: list[str] = []
    for item in metadata:
        for cls, name, sign in _BOUNDS:
            if isinstance(item, cls):
                out.append(f"{sign} {getattr(item, name)}")
        if isinstance(item, annotated_types.MinLen) and item.min_length:
            out.append(f"at least {item.min_length} items")
        if isinstance(item, annotated_types.MaxLen):
            out.append(f"at most {item.max_length} items")
        if isinstance(item, FieldInfo):
            out.extend(_constraints(item.metadata))
    return out


def _type_text(annotation: Any) -> tuple[str, list[str]]:
    """A readable type and the allowed values it implies (Literal choices, element bounds)."""
    annotation, metadata = _strip(annotation)
    allowed = _constraints(metadata)
    origin = get_origin(annotation)
    if origin is Literal:
        return "choice", [" / ".join(json.dumps(v) for v in get_args(annotation))]
    if origin in (Union, types.UnionType):
        parts = [_type_text(a) for a in get_args(annotation)]
        return " or ".join(p[0] for p in parts), allowed + [a for p in parts for a in p[1]]
    if origin in (list, tuple):
        args = [a for a in get_args(annotation) if a is not Ellipsis]
        inner = [_type_text(a) for a in args]
        name = "list" if origin is list else "pair" if len(args) == 2 else "tuple"
        element = ", ".join(dict.fromkeys(i[0] for i in inner))
        each = [f"each {a}" for i in inner[:1] for a in i[1]]
        return f"{name}[{element}]", allowed + each
    if annotation is type(None):
        return "null", allowed
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return "choice", [" / ".join(json.dumps(m.value) for m in annotation)]
    name = getattr(annotation, "__name__", str(annotation))
    return {"PosixPath": "path", "Path": "path"}.get(name, name), allowed


def _default(field: FieldInfo) -> Any:
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return json.loads(json.dumps(value, default=str))


def sections(model: type[BaseModel] = RunConfig) -> Iterator[Section]:
    """Every section of ``model``, depth first, each once; nested models and each kind of a union are sections of
    their own. Sibling fields of one model class (the cluster's per-stage resources) are one section keyed
    ``<stage>``."""
    seen: set[tuple[str, str | None]] = set()
    for section in _sections(model, "", None, "kind"):
        if (section.key, section.kind) not in seen:  # e.g. the quantizer, under each VQ-VAE arch
            seen.add((section.key, section.kind))
            yield section


def _sections(model: type[BaseModel], prefix: str, kind: str | None, discriminator: str) -> Iterator[Section]:
    entries: list[Entry] = []
    nested: dict[tuple[Any, ...], list[str]] = {}
    for name, field in model.model_fields.items():
        members = _model_members(field.annotation)
        if members is not None:
            # Top-level sections are each a stage's own; deeper siblings of one class are grouped.
            nested.setdefault((*members, name) if not prefix else tuple(members), []).append(name)
            continue
        type_text, allowed = _type_text(field.annotation)
        allowed += [a for a in _constraints(field.metadata) if a not in allowed]
        entries.append(Entry(f"{prefix}{name}", type_text, _default(field), "; ".join(allowed),
                             field.description or ""))
    yield Section(prefix.rstrip(".") or "(top level)", _doc(model), entries, kind, discriminator)
    for group, names in nested.items():
        members = [m for m in group if not isinstance(m, str)]
        key = f"{prefix}{names[0]}" if len(names) == 1 else f"{prefix}{STAGE}"
        for member in members:
            field_name = next((f for f in ("kind", "arch") if f in member.model_fields), "kind")
            member_kind = _default(member.model_fields[field_name]) if len(members) > 1 else None
            for section in _sections(member, f"{key}.", member_kind, field_name):
                doc = section.doc if len(names) == 1 else f"One for each of: {', '.join(names)}. {section.doc}"
                yield Section(section.key, doc.strip(), section.entries, section.kind, section.discriminator)


def _doc(model: type[BaseModel]) -> str:
    own = model.__dict__.get("__doc__")  # not a base class's docstring
    return " ".join(textwrap.dedent(own).split()) if own else ""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        return {k: v for name, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{name}.").items()}
    return {prefix.rstrip("."): tree}


def preset_values() -> dict[str, dict[str, Any]]:
    """Preset name -> {dotted key: value} of its complete configuration (run_dir left out: it names a folder)."""
    return {name: _flatten({k: v for k, v in preset_tree(name).items() if k != "run_dir"}) for name in PRESETS}


def _value(value: Any) -> str:
    return json.dumps(value)


def _differences(section: Section, presets: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Entry key -> {preset: value} where the preset differs from the default (and, in a section of one
    kind, only for presets that choose that kind; in a ``<stage>`` section, per stage)."""
    out: dict[str, dict[str, Any]] = {}
    for entry in section.entries:
        for name, values in presets.items():
            if section.kind is not None and values.get(f"{section.key}.{section.discriminator}") != section.kind:
                continue
            head, _, tail = entry.key.partition(STAGE)
            found = {k: v for k, v in values.items()
                     if k == entry.key or (tail and k.startswith(head) and k.endswith(tail)
                                           and "." not in k[len(head):-len(tail)])}
            for key, value in found.items():
                if value != entry.default and key != "preset":
                    label = name if key == entry.key else f"{name} ({key[len(head):-len(tail)]})"
                    out.setdefault(entry.key, {})[label] = value
    return out


def _title(section: Section) -> str:
    return f"`{section.key}`" + (f" ({section.discriminator} `{section.kind}`)" if section.kind else "")


def markdown() -> str:
    presets = preset_values()
    lines = [
        "# Configuration reference",
        "",
        "Generated by `python launch/pipeline.py --help-config --markdown` from the config models; a test fails",
        "when this file differs from what the command prints. Every key is set the same way everywhere:",
        "`KEY=VALUE` overrides after any command (`vqvae_train.lr=0.0005`, `vqvae.channels=[32,64]`,",
        "`cluster.setup='[\"module load cuda\"]'`), on top of a preset (`--preset NAME`) or a saved config",
        "(`--config RUN_DIR/config.json`). Values are JSON (strings may go without quotes); `null` means none.",
        "A section that is one of several kinds is switched by one key: `vqvae.quantizer.kind` resets the quantizer",
        "to that kind's defaults; `vqvae.arch` and `prior.arch` keep the settings the kinds share and take the",
        "preset's values for the new kind's own; later overrides then apply. A key of another kind is refused.",
        "",
        f"Presets: {', '.join(f'`{p}`' for p in PRESETS)}. The last column gives a preset's value where it",
        "differs from the default.",
        "",
    ]
    for section in sections():
        lines += [f"## {_title(section)}", ""]
        if section.doc:
            lines += [section.doc, ""]
        if not section.entries:
            continue
        diffs = _differences(section, presets)
        lines += ["| key | type | default | allowed | description | presets |", "|---|---|---|---|---|---|"]
        for e in section.entries:
            by_preset = "<br>".join(f"{p}: `{_value(v)}`" for p, v in diffs.get(e.key, {}).items())
            cells = [f"`{e.key}`", e.type, f"`{_value(e.default)}`", e.allowed, e.description, by_preset]
            lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def text(width: int = 100) -> str:
    presets = preset_values()
    out = ["Configuration keys (set any as KEY=VALUE after a command; --help-config --markdown for a table):", ""]
    for section in sections():
        if not section.entries:
            continue
        out.append(f"[{section.key}]" + (f" {section.discriminator}={section.kind}" if section.kind else ""))
        diffs = _differences(section, presets)
        for e in section.entries:
            head = f"  {e.key} = {_value(e.default)}  ({e.type}{'; ' + e.allowed if e.allowed else ''})"
            out.append(head)
            detail = e.description
            if e.key in diffs:
                detail += " [" + ", ".join(f"{p}: {_value(v)}" for p, v in diffs[e.key].items()) + "]"
            if detail:
                out.extend(textwrap.wrap(detail, width, initial_indent="      ", subsequent_indent="      "))
        out.append("")
    return "\n".join(out)


def undescribed() -> list[str]:
    """Keys without a description (the reference must explain every one)."""
    return [e.key for s in sections() for e in s.entries if not e.description.strip()]
