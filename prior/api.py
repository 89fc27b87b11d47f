"""The generator: a trained prior and its tokenizer, drawing class-conditional lesion images, loadable by itself.

    generator = Generator.from_pretrained("runs/smoke")      # run dir, its prior/ folder, or export/prior/
    out = generator.sample(["MEL", "NV"], n=4, seed=0)       # out.images: 8×3×S×S in [0, 1], out.codes, out.labels

Deterministic for a seed. The sample stage draws through :meth:`Generator.batches`, task I of N with the seed
``runtime.seeding.derive_seed(sample.seed, "sample-task", I, N)`` and ``batch_size=sample.batch_size``: the same
call through the API gives its samples.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import ValidationError
from torch import Tensor

from prior.base import AutoregressivePrior
from prior.config import PriorConfig, SampleConfig, parse_prior_config
from prior.models import build_prior
from runtime.pretrained import Pretrained, PretrainedError, find_model, load_verified, read_model_config
from shards.config import CLASSES
from vqvae.api import CodeGrids, Tokenizer

MODEL_TYPE = "lesion-vq-prior"

ClassChoice = int | str
"""A class by index (0..6, the order of ``shards.config.CLASSES``) or by name (``"MEL"``)."""


class SamplingError(PretrainedError):
    """Classes or sampling settings the generator cannot use."""


@dataclass
class Samples:
    images: Tensor
    """B×3×S×S float images in [0, 1]."""
    codes: Tensor
    """B×Hc×Wc LongTensor code grids the images were decoded from."""
    labels: Tensor
    """B class indices."""


def prior_config(prior: PriorConfig, codebook_size: int, grid: tuple[int, int]) -> dict[str, Any]:
    """What a prior folder's config.json holds besides the weights' hash and lineage."""
    return {"model_type": MODEL_TYPE, "prior": prior.model_dump(mode="json"), "codebook_size": codebook_size,
            "grid": list(grid), "classes": list(CLASSES)}


def class_indices(classes: ClassChoice | Sequence[ClassChoice]) -> list[int]:
    """Class indices of ``classes`` (one or a list, by index or name), each checked to be a lesion class."""
    items = [classes] if isinstance(classes, int | str) else list(classes)
    out = []
    for c in items:
        if isinstance(c, str) and c in CLASSES:
            out.append(CLASSES.index(c))
        elif isinstance(c, int) and not isinstance(c, bool) and 0 <= c < len(CLASSES):
            out.append(c)
        else:
            raise SamplingError(f"class {c!r} is not a lesion class; allowed: 0..{len(CLASSES) - 1} or "
                                f"{', '.join(CLASSES)}")
    if not out:
        raise SamplingError("no classes given")
    return out


class Generator(CodeGrids, Pretrained):
    """A prior over code grids and the tokenizer that decodes them."""

    model_type: ClassVar[str] = MODEL_TYPE
    places: ClassVar[tuple[str, ...]] = ("prior/final", "export/prior", "prior")

    def __init__(self, model: AutoregressivePrior, tokenizer: Tokenizer, config: dict[str, Any],
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        super().__init__(model, config, device, dtype)
        self.tokenizer = tokenizer
        self.settings = parse_prior_config(config["prior"])
        if (tokenizer.codebook_size, tokenizer.grid) != (self.codebook_size, self.grid):
            raise PretrainedError(f"the prior draws {self.grid[0]}x{self.grid[1]} grids of {self.codebook_size} "
                                  f"codes, the tokenizer makes {tokenizer.grid[0]}x{tokenizer.grid[1]} grids of "
                                  f"{tokenizer.codebook_size}: they were not trained together")

    @classmethod
    def load(cls, folder: Path, config: dict[str, Any], device: torch.device, dtype: torch.dtype,
             tokenizer: Tokenizer | None = None) -> Generator:
        try:
            model = build_prior(parse_prior_config(config.get("prior")), int(config["codebook_size"]),
                                len(config["classes"]))
        except (ValueError, KeyError, TypeError) as err:
            raise PretrainedError(f"{folder / 'config.json'} does not describe a prior: "
                                  f"{str(err).splitlines()[0]}") from None
        load_verified(model, folder, config)
        tokenizer = tokenizer or _tokenizer_beside(folder, config, device, dtype)
        return cls(model, tokenizer, config, device, dtype)

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.config["classes"])

    def sample(self, classes: ClassChoice | Sequence[ClassChoice], n: int = 1, *, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, guidance_scale: float = 1.0, seed: int | torch.Generator = 0,
               batch_size: int = 32) -> Samples:
        """``n`` samples of each of ``classes`` (by index or name), class by class; the same seed gives the same
        samples. temperature / top_k / top_p / guidance_scale / batch_size mean what the ``sample`` settings do."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise SamplingError(f"n must be a positive number of samples per class, got {n!r}")
        labels = [c for c in class_indices(classes) for _ in range(n)]
        if isinstance(seed, torch.Generator):
            rng = seed
        elif isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**63:
            rng = torch.Generator().manual_seed(seed)
        else:
            raise SamplingError(f"seed must be an integer in 0..2**63-1 or a torch.Generator, got {seed!r}")
        parts = list(self.batches(labels, rng, temperature=temperature, top_k=top_k, top_p=top_p,
                                  guidance_scale=guidance_scale, batch_size=batch_size))
        return Samples(*(torch.cat([getattr(p, name) for p in parts]) for name in ("images", "codes", "labels")))

    def batches(self, labels: Sequence[int], rng: torch.Generator, *, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0, guidance_scale: float = 1.0, batch_size: int = 32) -> Iterator[Samples]:
        """Samples of the class ``labels`` in batches of ``batch_size``, drawn in order with ``rng`` (a CPU
        generator: the draws do not depend on the device)."""
        try:
            SampleConfig(temperature=temperature, top_k=top_k, top_p=top_p, guidance_scale=guidance_scale,
                         batch_size=batch_size)
        except ValidationError as err:
            problem = err.errors()[0]
            raise SamplingError(f"{'.'.join(map(str, problem['loc']))}: {problem['msg']} "
                                f"(got {problem.get('input')!r})") from None
        if guidance_scale != 1.0 and not getattr(self.settings, "guidance", False):
            raise SamplingError(f"guidance_scale={guidance_scale}: classifier-free guidance needs a conditional "
                                f"transformer prior trained with label dropout; this one is a {self.settings.arch} "
                                f"prior{'' if self.settings.conditional else ' (unconditional)'}; allowed: 1.0")
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        for lo in range(0, len(labels), batch_size):
            batch = torch.tensor(labels[lo: lo + batch_size], dtype=torch.long, device=self.device)
            with torch.inference_mode(), autocast:
                codes = self.model.sample(len(batch), self.grid, batch if self.settings.conditional else None,
                                          temperature=temperature, generator=rng, top_k=top_k, top_p=top_p,
                                          guidance_scale=guidance_scale)
            yield Samples(self.tokenizer.decode(codes), codes, batch)


def _tokenizer_beside(folder: Path, config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Tokenizer:
    """The tokenizer a prior folder was trained with: a sibling in an export folder (export/tokenizer), the run's
    vqvae/ for a stage folder; checked to be the one its codes came from (the lineage both record)."""
    for place in list(folder.parents)[:3]:
        try:
            found = find_model(place, Tokenizer.model_type, Tokenizer.places)
        except PretrainedError:
            continue
        tokenizer_cfg = read_model_config(found, Tokenizer.model_type)
        mine, theirs = config.get("lineage", {}).get("vqvae"), tokenizer_cfg.get("lineage", {}).get("vqvae")
        if mine and theirs and mine != theirs:
            raise PretrainedError(f"{folder} was trained on the codes of VQ-VAE {mine}, but the tokenizer in {found} "
                                  f"is VQ-VAE {theirs}; pass the right one: Generator.from_pretrained(..., "
                                  "tokenizer=Tokenizer.from_pretrained(PATH))")
        return Tokenizer.load(found, tokenizer_cfg, device, dtype)
    raise PretrainedError(f"no tokenizer found beside the prior in {folder} (looked in its parent folders for "
                          "export/tokenizer or vqvae/final); pass one: Generator.from_pretrained(..., "
                          "tokenizer=Tokenizer.from_pretrained(PATH))")
