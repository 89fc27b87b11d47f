"""The stage registry and the run layout: the one place a stage is declared and a run's paths are named.

Pipeline (local and ``--cluster``), ``--emit-sbatch`` and ``slurm/stage.sh``, dry-run, the report and
every stage's own entry point iterate over :data:`STAGES`; paths come from :class:`RunLayout`.
Adding a stage = one :class:`Stage` entry here plus its entry module (see README, "Where a change goes").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from runtime.errors import UserError
from runtime.files import atomic_write_json

StageKind = Literal["single", "array", "training"]


@dataclass(frozen=True)
class Stage:
    name: str
    folder: str
    """Output folder inside the run directory."""
    module: str
    """``python -m MODULE --config C`` runs one task of it (training stages: under ``accelerate launch``)."""
    kind: StageKind
    sections: tuple[str, ...]
    """Config sections its outputs depend on (without the fields marked NOT_IN_IDENTITY, runtime/schema.py)."""
    upstream: tuple[str, ...]
    resources: str
    """Attribute of ``cfg.cluster`` holding its Slurm resources."""
    manifest_format: str
    array_size: str | None = None
    """For array stages: the config key holding the number of tasks."""
    always_rerun: bool = False
    """Cheap summaries of everything else (the report): never up to date, never part of a lineage."""
    format_change: str = ""
    """Why outputs of the previous manifest format are re-made (said when such a run is planned)."""

    @property
    def script(self) -> str:
        """Path of the entry module relative to the repository root (``accelerate launch`` wants a file)."""
        return self.module.replace(".", "/") + ".py"

    def optim(self, cfg: Any) -> Any:
        """A training stage's optimisation settings (its second config section)."""
        if self.kind != "training":
            raise ValueError(f"{self.name} is not a training stage")
        return getattr(cfg, self.sections[1])

    def tasks(self, cfg: Any) -> int:
        if self.array_size is None:
            return 1
        section, key = self.array_size.split(".")
        return int(getattr(getattr(cfg, section), key))


STAGES: tuple[Stage, ...] = (
    Stage("data", "data", "shards.stage", "single", ("data",), (), "data", "lesion-vq/image-shards/v1"),
    Stage("vqvae", "vqvae", "vqvae.train", "training", ("vqvae", "vqvae_train"), ("data",), "train_vqvae",
          "lesion-vq/vqvae/v1"),
    Stage("encode", "codes", "vqvae.encode", "array", ("encode",), ("vqvae", "data"), "encode",
          "lesion-vq/code-shards/v1", array_size="encode.num_tasks"),
    Stage("prior", "prior", "prior.train", "training", ("prior", "prior_train"), ("encode",), "train_prior",
          "lesion-vq/prior/v3", format_change="a prior's identity now hashes only its own arch's settings (v2 hashed "
          "every arch's: a transformer's identity held PixelCNN-only settings), so earlier priors are re-made once"),
    Stage("sample", "samples", "prior.sample", "array", ("sample",), ("prior", "vqvae", "encode"), "sample",
          "lesion-vq/sample-shards/v3", array_size="sample.num_tasks",
          format_change="the sample stage now also writes its samples as a labelled data set (samples/dataset/: "
          "PNG files and a HAM10000-layout CSV), which the augment stage reads"),
    Stage("classifier", "classifier", "judge.train", "training", ("classifier", "classifier_train"), ("data",),
          "classifier", "lesion-vq/classifier/v1"),
    Stage("evaluate", "evaluate", "judge.evaluate", "single", ("evaluate",), ("classifier", "vqvae", "sample", "data"),
          "evaluate", "lesion-vq/evaluation/v3"),
    Stage("augment", "augment", "judge.augment", "single", ("augment", "classifier", "classifier_train"),
          ("data", "sample"), "augment", "lesion-vq/augment/v1"),
    Stage("export", "export", "launch.export", "single", (), ("data", "vqvae", "prior", "classifier", "evaluate"),
          "export", "lesion-vq/export/v1"),
    Stage("report", "report", "launch.report", "single", (), ("evaluate", "augment"), "report", "lesion-vq/report/v1",
          always_rerun=True),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
_BY_NAME = {s.name: s for s in STAGES}


def stage(name: str) -> Stage:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UserError(f"unknown stage {name!r}; allowed: {', '.join(STAGE_NAMES)}") from None


def downstream(names: set[str]) -> list[str]:
    """``names`` and every stage that (transitively) reads them, in pipeline order."""
    out: list[str] = []
    for s in STAGES:
        if s.name in names or any(u in out for u in s.upstream):
            out.append(s.name)
    return out


def upstream(name: str) -> list[str]:
    """``name`` and every stage it (transitively) reads, in pipeline order."""
    needed = {name}
    for s in reversed(STAGES):  # STAGES is in pipeline order: a stage comes after everything it reads
        if s.name in needed:
            needed.update(s.upstream)
    return [s.name for s in STAGES if s.name in needed]


# ----- paths -----------------------------------------------------------------------------------------
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


SHARD_PATTERN = "shard-%06d.tar"
"""The same name as a printf pattern, for webdataset's ShardWriter."""


@dataclass(frozen=True)
class RunLayout:
    """Every path inside a run directory."""

    root: Path

    @classmethod
    def of(cls, cfg: Any) -> RunLayout:
        return cls(Path(cfg.run_dir))

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def pipeline(self) -> Path:
        """The pipeline's own bookkeeping (lock, timings, last cluster submission)."""
        return self.root / ".pipeline"

    @property
    def lock(self) -> Path:
        return self.pipeline / "lock"

    @property
    def jobs(self) -> Path:
        return self.pipeline / "jobs.json"

    def timing(self, name: str) -> Path:
        return self.pipeline / f"{name}.timing.json"

    def stage_dir(self, name: str) -> Path:
        return self.root / stage(name).folder

    def manifest(self, name: str) -> Path:
        return self.stage_dir(name) / MANIFEST

    @property
    def judged(self) -> Path:
        """Results of ``judge/evaluate.py --images`` (other image sets judged with this run's models)."""
        return self.root / "judged"

    def slurm_dir(self, name: str) -> Path:
        """submitit's files and the job logs of a stage."""
        return self.root / "slurm" / name


# ----- manifests ---------------------------------------------------------------------------------------
class ManifestError(UserError, ValueError):
    """A stage output without a complete, readable manifest of the expected format."""


_MAKERS = "python launch/pipeline.py --only {name} --config RUN_DIR/config.json"


def read_manifest(folder: Path, fmt: str | tuple[str, ...] | None = None) -> dict[str, Any]:
    """The manifest in ``folder``, checked to be a JSON object of format ``fmt`` (any lesion-vq one if None)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path} is missing: {folder} is not a complete lesion-vq output "
                            "(manifests are written last)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ManifestError(f"{path} is unreadable or incomplete: {err}") from None
    formats = (fmt,) if isinstance(fmt, str) else fmt
    got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
    if not isinstance(manifest, dict) or (formats and got not in formats) or not str(got).startswith("lesion-vq/"):
        expected = " or ".join(formats) if formats else "a lesion-vq format"
        raise ManifestError(f"{path} has format {got!r}; expected {expected}")
    return manifest


LINEAGE_FIELDS = {"identity": str, "content": str, "settings": dict, "upstream": dict, "lineage": dict}
"""What every stage manifest records about where it came from (runtime/lineage.py writes them)."""


def read_stage_manifest(folder: Path, name: str) -> dict[str, Any]:
    """A completed stage's manifest with its lineage fields, or one line saying how to make it."""
    if not (Path(folder) / MANIFEST).is_file():
        raise ManifestError(f"{Path(folder) / MANIFEST} not found: the {name} stage has not completed for this "
                            f"run. Run it first: {_MAKERS.format(name=name)}")
    manifest = read_manifest(folder, stage(name).manifest_format)
    bad = [k for k, kind in LINEAGE_FIELDS.items() if not isinstance(manifest.get(k), kind)]
    if bad:
        raise ManifestError(f"{Path(folder) / MANIFEST} lacks {', '.join(bad)}: written by an older lesion-vq "
                            "or edited by hand, so its lineage cannot be checked. Re-make it: "
                            f"{_MAKERS.format(name=name)}")
    return manifest


def write_manifest(folder: Path, body: dict[str, Any]) -> None:
    """Written last and atomically: its presence means the output is complete."""
    atomic_write_json(Path(folder) / MANIFEST, body)
