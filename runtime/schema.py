"""What every config section is built from: the strict base model, shared value types, sections that are one of
several kinds, and the field metadata that says whether a setting is part of an output's identity.

Each component's settings live beside its code (``shards/config.py``, ``vqvae/config.py``, ``prior/config.py``,
``judge/config.py``, ``runtime/train_config.py``, ``launch/config.py``); ``runtime/config.py`` assembles them into
``RunConfig``. This module imports nothing from the pipeline, so model packages may use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


class Strict(BaseModel):
    # allow_inf_nan=False: 1e309 parses to inf, and inf / NaN would be saved as null, leaving a
    # config.json that can never load again (and a training that diverges at step 0).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# ----- identity metadata: on the field itself ----------------------------------------------------------
NOT_IN_IDENTITY: dict[str, Any] = {"identity": False}
"""``Field(..., json_schema_extra=NOT_IN_IDENTITY)``: how fast, how often or where from, never what: the setting
changes no output byte, so it is left out of every stage identity (runtime/lineage.py)."""


def added_setting(old_value: Any) -> dict[str, Any]:
    """``Field(..., json_schema_extra=added_setting(V))``: a setting added after outputs were made, where ``V``
    reproduces those outputs. At ``V`` it is left out of the identity, so upgrading lesion-vq never makes a
    finished stage stale; any other value is hashed as usual."""
    return {"identity_unless": old_value}


def _extra(model: type[BaseModel], name: str) -> dict[str, Any]:
    extra = model.model_fields[name].json_schema_extra
    return extra if isinstance(extra, dict) else {}


def in_identity(model: type[BaseModel], name: str) -> bool:
    """Whether field ``name`` of ``model`` can change outputs (False: marked NOT_IN_IDENTITY)."""
    return _extra(model, name).get("identity", True) is not False


def identity_values(section: BaseModel) -> dict[str, Any]:
    """``section`` as JSON values, without fields marked NOT_IN_IDENTITY and without added settings at their old
    value; nested sections alike. A section of one kind has only its kind's fields, so nothing another kind
    would use is hashed."""
    dumped = section.model_dump(mode="json")
    out: dict[str, Any] = {}
    for name in type(section).model_fields:
        value = getattr(section, name)
        extra = _extra(type(section), name)
        if extra.get("identity", True) is False:
            continue
        if "identity_unless" in extra and dumped[name] == extra["identity_unless"]:
            continue
        out[name] = identity_values(value) if isinstance(value, BaseModel) else dumped[name]
    return out


# ----- sections that are one of several kinds ----------------------------------------------------------
@dataclass(frozen=True)
class Kinds:
    """A config section that is one of several models, chosen by its field ``key`` (a pydantic discriminated
    union). Setting ``key`` switches the section to the new kind's defaults; with ``keep_shared`` the settings
    both kinds have keep their values (``prior.layers`` across ``prior.arch``), else none do."""

    key: str
    models: dict[str, type[Strict]]
    keep_shared: bool = False

    def switched(self, node: dict[str, Any], kind: str, preset_values: dict[str, Any]) -> dict[str, Any]:
        """The section ``node`` as kind ``kind``: its defaults, the preset's values for that kind, then (with
        ``keep_shared``) the values of ``node`` that the new kind also has."""
        model = self.models[kind]
        out = {**model().model_dump(mode="json"), **preset_values}
        if self.keep_shared:
            out.update({k: v for k, v in node.items() if k in model.model_fields and k != self.key})
        out[self.key] = kind
        return out


# ----- value types shared by several sections ----------------------------------------------------------
SEED_LIMIT = 2**32
"""Seeds are 0 <= seed < 2**32: torch.manual_seed overflows past 2**64 (a crash at training start), and
seed_everything folds numpy's seed modulo 2**32, so a larger seed would silently share numpy's stream
with a smaller one. Below 2**32 every consumer (random, numpy, torch, derive_seed) takes it as it is."""

Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT, description="random seed, 0 <= seed < 2**32")]

MAX_COUNT = 2**31 - 1
"""Upper bound of a count (images, steps, batch sizes, workers) no consumer limits more tightly: a C int, what
torch, numpy and the DataLoader take for sizes and counters. A larger value (``1e20`` parses as an integer) was
saved into config.json and then failed as an OverflowError traceback in whichever stage used it first."""
MAX_ARRAY_TASKS = 1000
"""Tasks of an array stage at most: one Slurm array (``--array=0-N``), whose largest index must stay below
Slurm's MaxArraySize (default 1001)."""
MAX_TIME_MIN = 366 * 24 * 60
"""A Slurm time limit at most (minutes): a year; a larger ``#SBATCH --time`` is refused or taken as unlimited."""


def _path_text(value: Any) -> Any:
    # Path("") is "." (the current folder) and a NUL byte fails at the first open: both are typos.
    if isinstance(value, str) and (not value.strip() or "\x00" in value):
        raise ValueError("must be a path, not empty and without NUL characters")
    problem = not_utf8(value) if isinstance(value, str) else None
    if problem:
        raise ValueError(problem)
    return value


def not_utf8(path: str | Path) -> str | None:
    """Why ``path`` cannot be recorded (None when it can): a name with bytes that are not UTF-8 (Python keeps them
    as surrogates) fits no config.json or manifest. Checked where a path enters (config keys, --out, --images),
    before a folder is created, not as a serialisation traceback afterwards."""
    text = str(path)
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        return (f"{shown} holds bytes that are not UTF-8; rename it (or link to it from a UTF-8 name): lesion-vq "
                "records every path in JSON")
    return None


UserPath = Annotated[Path, BeforeValidator(_path_text)]

ClassBalance = Literal["none", "sqrt", "inverse"]
"""How a training loss weighs classes: none, count^-1/2 or count^-1 (runtime/balance.py)."""
