"""A trained model in a folder of its own: ``config.json`` (what to build, the weights' sha256, the lineage it came
from) beside ``model.safetensors``, the Hugging Face layout. Every training stage writes one into
``STAGE/final/``; the export stage writes ``RUN_DIR/export/{tokenizer,prior,classifier}/`` (plus a model card).

:class:`Pretrained` is the base of the Python API classes (``vqvae.Tokenizer``, ``prior.Generator``,
``judge.Classifier``): ``from_pretrained`` is huggingface_hub's ``PyTorchModelHubMixin.from_pretrained``, and
for a local path it takes a run directory, a stage folder or an exported folder; the weights are verified
against the sha256 their config.json records before a byte of them is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from huggingface_hub import PyTorchModelHubMixin

from runtime.checkpoint import CheckpointError, load_weights, save_weights
from runtime.errors import UserError
from runtime.files import atomic_write_json, sha256_file
from runtime.integrity import IntegrityError, verified_file

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
FORMAT = "lesion-vq/pretrained/v1"
"""``format`` of a pretrained folder's config.json."""

T = TypeVar("T", bound="Pretrained")


class PretrainedError(UserError, ValueError):
    """A model folder or an input the API cannot use: one line naming what is wrong and where."""


def write_model_config(folder: Path, config: dict[str, Any]) -> None:
    """``folder/config.json``: ``config`` plus the format and the sha256 of ``folder/model.safetensors``, which
    must already be written (the config describes those very bytes)."""
    atomic_write_json(Path(folder) / CONFIG, {**config, "format": FORMAT,
                                              "weights_sha256": sha256_file(Path(folder) / WEIGHTS)})


def write_pretrained(folder: Path, model: torch.nn.Module, config: dict[str, Any]) -> None:
    """Weights, then the config that describes them (each written atomically)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    save_weights(model, Path(folder) / WEIGHTS)
    write_model_config(folder, config)


def read_model_config(folder: Path, model_type: str | None = None) -> dict[str, Any]:
    """``folder/config.json``, checked to be a lesion-vq model config (of ``model_type`` when given)."""
    path = Path(folder) / CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PretrainedError(f"{path} is not a readable model config ({err})") from None
    found = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(config, dict) or config.get("format") != FORMAT or (model_type and found != model_type):
        raise PretrainedError(f"{path} is not a lesion-vq {model_type or 'model'} config (model_type {found!r}, "
                              f"format {config.get('format') if isinstance(config, dict) else None!r})")
    return config


def _holds(folder: Path, model_type: str) -> bool:
    try:
        read_model_config(folder, model_type)
    except PretrainedError:
        return False
    return (folder / WEIGHTS).is_file()


def find_model(path: Path, model_type: str, places: tuple[str, ...]) -> Path:
    """The folder holding a ``model_type`` model: ``path`` itself, ``path/final`` (a stage folder), or
    ``path/PLACE`` for each of ``places`` (where a run directory or an export folder keeps it)."""
    path = Path(path).resolve()
    candidates = [path, path / "final", *(path / place for place in places)]
    for folder in candidates:
        if _holds(folder, model_type):
            return folder
    if not path.exists():
        raise PretrainedError(f"{path} does not exist")
    looked = ", ".join(str(c.relative_to(path)) for c in candidates[1:])
    raise PretrainedError(f"{path} holds no lesion-vq {model_type} model ({CONFIG} + {WEIGHTS} in it or in "
                          f"{looked}); give a run directory, its stage folder or an exported folder")


def load_verified(model: torch.nn.Module, folder: Path, config: dict[str, Any]) -> torch.nn.Module:
    """``folder/model.safetensors`` into ``model`` after checking its sha256 against ``config``; a config that
    does not fit the weights is one error naming both."""
    try:
        weights = verified_file(folder, WEIGHTS, config.get("weights_sha256"), manifest=Path(folder) / CONFIG)
        load_weights(model, weights)
    except IntegrityError as err:
        raise PretrainedError(str(err)) from None
    except (CheckpointError, RuntimeError) as err:  # RuntimeError: torch's size mismatch of a tensor
        problem = " ".join(str(err).split())[:300]
        raise PretrainedError(f"{Path(folder) / CONFIG} does not describe {Path(folder) / WEIGHTS}: "
                              f"{problem}") from None
    return model


class Pretrained(PyTorchModelHubMixin, library_name="lesion-vq", license="cc-by-nc-4.0",
                 tags=["lesion-vq", "dermoscopy", "vq-vae", "research-only"]):
    """Base of the API classes: a model in eval mode on ``device`` in ``dtype`` and the config that describes it.
    Subclasses set :attr:`model_type` and :attr:`places` and implement :meth:`load` (a folder :func:`find_model`
    found -> an instance)."""

    model_type: ClassVar[str]
    places: ClassVar[tuple[str, ...]]

    def __init__(self, model: torch.nn.Module, config: dict[str, Any], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.model = model.to(device=device, dtype=dtype).eval()
        self.config = config
        self.device, self.dtype = torch.device(device), dtype

    @classmethod
    def load(cls: type[T], folder: Path, config: dict[str, Any], device: torch.device, dtype: torch.dtype,
             **kwargs: Any) -> T:
        raise NotImplementedError

    def network(self) -> torch.nn.Module:
        """The module whose weights the folder holds."""
        return self.model

    @classmethod
    def from_pretrained(cls: type[T], pretrained_model_name_or_path: str | Path, **kwargs: Any) -> T:
        """huggingface_hub's ``from_pretrained`` (``device=``, ``dtype=``; ``tokenizer=`` for a Generator), with one
        line for a path that is neither a folder here nor a Hub repository that can be fetched."""
        name = str(pretrained_model_name_or_path)
        local = Path(name)
        if local.exists():
            if (local / CONFIG).is_file():  # huggingface_hub reads it first: a damaged one is named here, not there
                try:
                    json.loads((local / CONFIG).read_text())
                except (OSError, ValueError) as err:
                    raise PretrainedError(f"{local / CONFIG} is not readable JSON ({err})") from None
            return super().from_pretrained(name, **kwargs)
        if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
            raise PretrainedError(f"{name} does not exist")
        try:
            return super().from_pretrained(name, **kwargs)
        except PretrainedError:
            raise
        except Exception as err:  # the Hub client's many error types (offline, unknown repository, ...)
            raise PretrainedError(f"{name} is not a folder here, and fetching it from the Hugging Face Hub failed: "
                                  f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None

    @classmethod
    def _from_pretrained(cls: type[T], *, model_id: str, revision: str | None = None, cache_dir: Any = None,
                         force_download: bool = False, proxies: Any = None, resume_download: Any = None,
                         local_files_only: bool = False, token: Any = None, device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float32, config: Any = None, **kwargs: Any) -> T:
        # config: what huggingface_hub read from PATH/config.json, re-read below from the folder actually found.
        if Path(model_id).exists():
            folder = find_model(Path(model_id), cls.model_type, cls.places)
        else:  # a Hub repository id: fetched as a whole (no network in the tests; documented in docs/library.md)
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(repo_id=model_id, revision=revision, cache_dir=cache_dir,
                                            force_download=force_download, proxies=proxies, token=token,
                                            local_files_only=local_files_only))
        return cls.load(folder, read_model_config(folder, cls.model_type), torch.device(device), dtype, **kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        """``save_pretrained`` / ``push_to_hub``: this model's folder (weights + config.json)."""
        keep = {k: v for k, v in self.config.items() if k not in ("format", "weights_sha256")}
        write_pretrained(Path(save_directory), self.network(), keep)
