"""``key=value`` overrides on a config tree, and sections that are one of several kinds.

A config tree is the JSON form of a ``RunConfig`` before validation. :func:`apply_override` sets one dotted key,
refusing unknown keys with the keys allowed there (and, for a setting of another kind, how to switch to it);
setting a kind section's ``kind``/``arch`` switches it (runtime/schema.py ``Kinds``).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from prior.config import PRIOR_KINDS
from runtime.errors import ConfigError
from runtime.presets import other_kind_values
from runtime.schema import Kinds
from vqvae.config import QUANTIZER_KINDS, VQVAE_KINDS

KIND_SECTIONS: dict[tuple[str, ...], Kinds] = {
    ("vqvae",): VQVAE_KINDS, ("vqvae", "quantizer"): QUANTIZER_KINDS, ("prior",): PRIOR_KINDS}
"""Config sections that are one of several kinds (pydantic discriminated unions), by their path."""


def merge(base: dict[str, Any], update: dict[str, Any], path: tuple[str, ...] = ()) -> dict[str, Any]:
    """``update`` over ``base``, section by section. A kind section of another kind in ``update`` replaces the
    base's (over the new kind's defaults): none of the old kind's settings apply."""
    out = dict(base)
    for key, value in update.items():
        old, where = out.get(key), (*path, key)
        if isinstance(value, dict) and isinstance(old, dict):
            kinds = KIND_SECTIONS.get(where)
            if kinds and value.get(kinds.key, old.get(kinds.key)) != old.get(kinds.key):
                old = _kind_defaults(kinds, value[kinds.key])
            out[key] = merge(old, value, where)
        else:
            out[key] = value
    return out


def _kind_defaults(kinds: Kinds, kind: Any) -> dict[str, Any]:
    """Every setting of ``kind`` at its default (an unknown kind is left for validation to refuse, naming the
    kinds)."""
    model = kinds.models.get(kind) if isinstance(kind, str) else None
    return model().model_dump(mode="json") if model else {kinds.key: kind}


def _set_kind(tree: dict[str, Any], node: dict[str, Any], section: tuple[str, ...], kind: Any) -> None:
    """Switch the kind section ``node`` to ``kind`` (later overrides then apply)."""
    kinds = KIND_SECTIONS[section]
    if kind == node.get(kinds.key):
        return
    dotted = ".".join(section)
    if not isinstance(kind, str) or kind not in kinds.models:
        raise ConfigError(f"{dotted}.{kinds.key}: unknown {kinds.key} {kind!r}; allowed: {', '.join(kinds.models)}")
    switched = kinds.switched(node, kind, other_kind_values(tree.get("preset"), section, kind))
    node.clear()
    node.update(switched)


def _kind_hint(section: tuple[str, ...], node: Any, key: str) -> tuple[str, str]:
    """For an unknown key in or next to a kind section: (" (kind K)", where ``key`` belongs)."""
    for inner, kinds in KIND_SECTIONS.items():  # e.g. vqvae.codebook_size, a setting of vqvae.quantizer
        if inner[:-1] == section and any(key in model.model_fields for model in kinds.models.values()):
            return "", f"; it is a setting of {'.'.join(inner)}: {'.'.join((*inner, key))}"
    kinds = KIND_SECTIONS.get(section)
    if kinds is None or not isinstance(node, dict):
        return "", ""
    owners = [kind for kind, model in kinds.models.items() if key in model.model_fields]
    switch = (f"; {key!r} belongs to {kinds.key} {' or '.join(owners)}: set {'.'.join(section)}.{kinds.key}="
              f"{owners[0]} before it") if owners else ""
    return f" ({kinds.key} {node.get(kinds.key)})", switch


def _parse_value(text: str) -> Any:
    """JSON when it parses (numbers, lists, true/false/null), else the raw string for pydantic to coerce."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_override(tree: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key=value (e.g. vqvae_train.batch_size=32)")
    dotted, raw = override.split("=", 1)
    keys = dotted.strip().split(".")
    node = tree
    for depth, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            where = ".".join(keys[:depth]) or "the top level"
            allowed = ", ".join(sorted(node)) if isinstance(node, dict) else "(not a section)"
            kind, switch = _kind_hint(tuple(keys[:depth]), node, key)
            raise ConfigError(f"unknown config key {dotted!r}: {key!r} is not in {where}{kind}; allowed: {allowed}"
                              f"{switch}")
        if depth == len(keys) - 1:
            value = _parse_value(raw)
            section = tuple(keys[:depth])
            if tuple(keys) in KIND_SECTIONS and isinstance(value, str):  # vqvae.quantizer=fsq: short for .kind=
                _set_kind(tree, node[key], tuple(keys), value)
            elif section in KIND_SECTIONS and key == KIND_SECTIONS[section].key:
                _set_kind(tree, node, section, value)
            else:
                node[key] = value
        else:
            node = node[key]


def _location(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as the dotted key a user types: the kind tag a discriminated union adds
    (``prior.transformer.heads``) is left out (``prior.heads``)."""
    parts: list[str] = []
    for part in loc:
        kinds = KIND_SECTIONS.get(tuple(parts))
        if kinds is not None and part in kinds.models:
            continue
        parts.append(str(part))
    return ".".join(parts)


def format_errors(err: ValidationError, what: str) -> str:
    """Every problem on ONE line (CLIs print it after "error: "), each naming its key."""
    problems = []
    for e in err.errors():
        key = _location(e["loc"]) or "config"
        got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
        problems.append(f"{key}: {e['msg']}{got}")
    return f"{what}: " + "; ".join(problems)
