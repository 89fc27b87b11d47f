"""The judge's classifier, loadable by itself: lesion class guesses and the features Fréchet distances use.

    classifier = Classifier.from_pretrained("runs/smoke")   # run dir, its classifier/ folder, or export/classifier/
    guesses = classifier.predict(images)                   # class indices (shards.config.CLASSES order)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from judge.classifier import build_classifier
from judge.config import ClassifierConfig
from runtime.pretrained import Pretrained, PretrainedError, load_verified
from shards.config import CLASSES
from vqvae.api import ImageBatch, image_batch

MODEL_TYPE = "lesion-vq-classifier"


def classifier_config(classifier: ClassifierConfig, image_size: int) -> dict[str, Any]:
    """What a classifier folder's config.json holds besides the weights' hash and lineage."""
    return {"model_type": MODEL_TYPE, "classifier": classifier.model_dump(mode="json"), "image_size": image_size,
            "classes": list(CLASSES)}


class Classifier(Pretrained):
    """The lesion classifier the evaluate stage judges with."""

    model_type: ClassVar[str] = MODEL_TYPE
    places: ClassVar[tuple[str, ...]] = ("classifier/final", "export/classifier", "classifier")

    @classmethod
    def load(cls, folder: Path, config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Classifier:
        try:
            model = build_classifier(ClassifierConfig.model_validate(config.get("classifier")), len(config["classes"]))
        except (ValueError, KeyError, TypeError) as err:
            raise PretrainedError(f"{folder / 'config.json'} does not describe a classifier: "
                                  f"{str(err).splitlines()[0]}") from None
        return cls(load_verified(model, folder, config), config, device, dtype)

    def network(self) -> torch.nn.Module:
        return self.model

    @property
    def image_size(self) -> int:
        return int(self.config["image_size"])

    @torch.inference_mode()
    def features(self, images: ImageBatch) -> Tensor:
        """B×F penultimate features (what the evaluate stage's Fréchet distances compare)."""
        return self.model.features(image_batch(images, self.image_size).to(self.device, self.dtype)).float()

    @torch.inference_mode()
    def predict(self, images: ImageBatch) -> Tensor:
        """B class indices (the order of :attr:`classes`)."""
        return self.model(image_batch(images, self.image_size).to(self.device, self.dtype)).argmax(1)

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.config["classes"])
