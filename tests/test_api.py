"""The Python API (vqvae.Tokenizer, prior.Generator, judge.Classifier) on model folders written in-process: loading,
what it accepts, and one clear error for each bad input. A trained, exported run: tests/test_export.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import PyTorchModelHubMixin
from PIL import Image

from judge.api import Classifier, classifier_config
from judge.classifier import build_classifier
from judge.config import ClassifierConfig
from prior.api import Generator, SamplingError, prior_config
from prior.config import GatedPriorConfig, TransformerPriorConfig
from prior.models import build_prior
from runtime.errors import UserError
from runtime.pretrained import CONFIG, WEIGHTS, PretrainedError, write_pretrained
from shards.config import CLASSES
from vqvae import Tokenizer
from vqvae.api import ImageInputError, tokenizer_config
from vqvae.config import EMAQuantizerConfig, ImprovedVQVAEConfig
from vqvae.models import build_vqvae

VQ = ImprovedVQVAEConfig(channels=[8, 16], res_blocks=0, code_dim=4, quantizer=EMAQuantizerConfig(codebook_size=16))
SIZE = 16  # 4x4 code grids
LINEAGE = {"data": "d/1", "vqvae": "v/1"}


def _tokenizer_folder(folder: Path, lineage: dict[str, str] = LINEAGE) -> Path:
    torch.manual_seed(0)
    write_pretrained(folder, build_vqvae(VQ), {**tokenizer_config(VQ, SIZE), "lineage": lineage})
    return folder


def _prior_folder(folder: Path, settings: object = None, lineage: dict[str, str] = LINEAGE) -> Path:
    settings = settings or GatedPriorConfig(filters=8, layers=1, kernel_size=3, embed_dim=4)
    torch.manual_seed(1)
    write_pretrained(folder, build_prior(settings, 16, len(CLASSES)),
                     {**prior_config(settings, 16, (4, 4)), "lineage": {**lineage, "prior": "p/1"}})
    return folder


@pytest.fixture
def export(tmp_path: Path) -> Path:
    """An export folder as the export stage lays it out (tokenizer/ and prior/ side by side)."""
    _tokenizer_folder(tmp_path / "export" / "tokenizer")
    _prior_folder(tmp_path / "export" / "prior")
    return tmp_path / "export"


def _images(n: int = 3, size: int = SIZE) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


# ----- loading ---------------------------------------------------------------------------------------
def test_tokenizer_loads_from_the_folder_or_above_it_and_describes_itself(export: Path, tmp_path: Path) -> None:
    for path in (export / "tokenizer", export, tmp_path):  # the folder, an export folder, a run dir
        tokenizer = Tokenizer.from_pretrained(path)
        assert (tokenizer.image_size, tokenizer.codebook_size, tokenizer.grid) == (SIZE, 16, (4, 4))
    # huggingface_hub's own from_pretrained, not a look-alike: a folder uploaded to the Hub loads the same way
    hub = PyTorchModelHubMixin.from_pretrained.__func__(Tokenizer, export / "tokenizer")  # type: ignore[attr-defined]
    assert torch.equal(hub.encode(_images()), tokenizer.encode(_images()))


def test_encode_decode_shapes_and_uint8_float_and_pil_agree(export: Path) -> None:
    tokenizer = Tokenizer.from_pretrained(export / "tokenizer")
    images = _images()
    codes = tokenizer.encode(images)
    assert codes.dtype == torch.long and codes.shape == (3, 4, 4) and 0 <= int(codes.min()) <= int(codes.max()) < 16
    assert torch.equal(tokenizer.encode(images.float() / 255), codes)
    pil = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
    assert torch.equal(tokenizer.encode(pil), codes)
    assert torch.equal(tokenizer.encode(images[0]), codes[:1])  # one 3×H×W image
    decoded = tokenizer.decode(codes)
    assert decoded.shape == (3, 3, SIZE, SIZE) and float(decoded.min()) >= 0 and float(decoded.max()) <= 1


def test_other_sizes_are_resized_as_packing_resizes(export: Path) -> None:
    from shards.images import resized

    tokenizer = Tokenizer.from_pretrained(export / "tokenizer")
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8))
    packed = torch.from_numpy(np.array(resized(big, SIZE))).permute(2, 0, 1)
    assert torch.equal(tokenizer.encode(big), tokenizer.encode(packed))
    as_tensor = torch.from_numpy(np.array(big)).permute(2, 0, 1)
    assert torch.equal(tokenizer.encode(as_tensor), tokenizer.encode(packed))


def test_save_pretrained_round_trips(export: Path, tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_pretrained(export / "tokenizer")
    tokenizer.save_pretrained(tmp_path / "saved")
    assert {p.name for p in (tmp_path / "saved").iterdir()} >= {CONFIG, WEIGHTS, "README.md"}
    again = Tokenizer.from_pretrained(tmp_path / "saved")
    assert torch.equal(again.encode(_images()), tokenizer.encode(_images()))


def test_generator_finds_its_tokenizer_and_samples_deterministically(export: Path) -> None:
    generator = Generator.from_pretrained(export / "prior")
    first = generator.sample(["MEL", 6], n=2, seed=3)
    assert first.codes.shape == (4, 4, 4) and first.images.shape == (4, 3, SIZE, SIZE)
    assert first.labels.tolist() == [0, 0, 6, 6]
    again = generator.sample(["MEL", 6], n=2, seed=3)
    assert torch.equal(first.codes, again.codes) and torch.equal(first.images, again.images)
    assert not torch.equal(generator.sample(["MEL", 6], n=2, seed=4).codes, first.codes)
    assert torch.equal(generator.tokenizer.decode(first.codes), first.images)


def test_batches_of_a_seed_are_what_sample_gives(export: Path) -> None:
    """The sample stage draws through batches() with its task seed: sample() with that seed gives the same."""
    generator = Generator.from_pretrained(export / "prior")
    labels = [0, 1, 2, 3, 4]
    parts = list(generator.batches(labels, torch.Generator().manual_seed(11), batch_size=2))
    assert [len(p.codes) for p in parts] == [2, 2, 1]
    whole = generator.sample(labels, n=1, seed=11, batch_size=2)
    assert torch.equal(torch.cat([p.codes for p in parts]), whole.codes)


def test_classifier_loads_and_predicts(tmp_path: Path) -> None:
    settings = ClassifierConfig(width=4)
    write_pretrained(tmp_path / "classifier", build_classifier(settings, len(CLASSES)),
                     classifier_config(settings, SIZE))
    classifier = Classifier.from_pretrained(tmp_path)
    guesses = classifier.predict(_images())
    assert guesses.shape == (3,) and int(guesses.max()) < len(CLASSES)
    assert classifier.features(_images()).shape[0] == 3


# ----- one clear error for each bad input --------------------------------------------------------------
def _refused(call, kind: type[Exception], *needles: str) -> str:
    with pytest.raises(kind) as err:
        call()
    message = str(err.value)
    assert isinstance(err.value, UserError) and "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_a_folder_without_a_model_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    _refused(lambda: Tokenizer.from_pretrained(tmp_path / "empty"), PretrainedError,
             "holds no lesion-vq lesion-vq-tokenizer model", str(tmp_path / "empty"))
    _refused(lambda: Tokenizer.from_pretrained(tmp_path / "missing"), PretrainedError, "does not exist")


def test_a_damaged_config_is_one_error_naming_it(export: Path) -> None:
    (export / "tokenizer" / CONFIG).write_text('{"model_type": ')
    _refused(lambda: Tokenizer.from_pretrained(export / "tokenizer"), PretrainedError,
             f"{export / 'tokenizer' / CONFIG} is not readable JSON")


def test_a_prior_folder_is_not_a_tokenizer(export: Path) -> None:
    _refused(lambda: Tokenizer.from_pretrained(export / "prior"), PretrainedError, "holds no lesion-vq")


def test_a_config_that_does_not_fit_its_weights_names_both(export: Path) -> None:
    config = json.loads((export / "tokenizer" / CONFIG).read_text())
    config["vqvae"]["channels"] = [8, 24]
    (export / "tokenizer" / CONFIG).write_text(json.dumps(config))
    _refused(lambda: Tokenizer.from_pretrained(export / "tokenizer"), PretrainedError,
             f"{export / 'tokenizer' / CONFIG} does not describe {export / 'tokenizer' / WEIGHTS}")


def test_weights_that_are_not_the_recorded_bytes_are_refused(export: Path) -> None:
    weights = export / "tokenizer" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    _refused(lambda: Tokenizer.from_pretrained(export / "tokenizer"), PretrainedError, "sha256", str(weights))


@pytest.mark.parametrize(("images", "needle"), [
    (torch.zeros(2, 1, SIZE, SIZE, dtype=torch.uint8), "B×3×H×W"),
    (torch.zeros(0, 3, SIZE, SIZE, dtype=torch.uint8), "B×3×H×W"),
    (torch.zeros(2, 3, SIZE, SIZE, dtype=torch.int32), "uint8 (0..255) or floating point"),
    (torch.full((1, 3, SIZE, SIZE), 255.0), "float images must hold values in [0, 1]"),
    (torch.full((1, 3, SIZE, SIZE), float("nan")), "float images must hold values in [0, 1]"),
    (np.zeros((SIZE, SIZE, 3), np.uint8), "a tensor or PIL images"),
    ([], "no images given"),
    (["lesion.jpg"], "image 0 is a str, not a PIL image"),
])
def test_images_of_an_unusable_shape_or_dtype_are_one_error(export: Path, images: object, needle: str) -> None:
    tokenizer = Tokenizer.from_pretrained(export / "tokenizer")
    _refused(lambda: tokenizer.encode(images), ImageInputError, needle)


@pytest.mark.parametrize(("codes", "needle"), [
    (torch.zeros(1, 5, 4, dtype=torch.long), "B×4×4 grids"),
    (torch.full((1, 4, 4), 16), "codes must lie in 0..15"),
    (torch.zeros(1, 4, 4), "integer tensor"),
])
def test_unusable_codes_are_one_error(export: Path, codes: torch.Tensor, needle: str) -> None:
    _refused(lambda: Tokenizer.from_pretrained(export / "tokenizer").decode(codes), ImageInputError, needle)


@pytest.mark.parametrize("classes", [7, -1, "XYZ", True, [0, 9], []])
def test_a_class_outside_the_seven_is_one_error(export: Path, classes: object) -> None:
    generator = Generator.from_pretrained(export / "prior")
    _refused(lambda: generator.sample(classes), SamplingError, "class" if classes != [] else "no classes")


@pytest.mark.parametrize(("options", "needle"), [
    ({"n": 0}, "n must be a positive number"),
    ({"temperature": 0.0}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"seed": -1}, "seed must be an integer"),
    ({"guidance_scale": 3.0}, "classifier-free guidance needs a conditional transformer prior"),
])
def test_impossible_sampling_settings_are_one_error(export: Path, options: dict, needle: str) -> None:
    generator = Generator.from_pretrained(export / "prior")
    _refused(lambda: generator.sample(0, **options), SamplingError, needle)


def test_guidance_works_on_a_transformer_trained_with_label_dropout(tmp_path: Path) -> None:
    _tokenizer_folder(tmp_path / "export" / "tokenizer")
    _prior_folder(tmp_path / "export" / "prior", TransformerPriorConfig(d_model=16, heads=2, layers=1))
    out = Generator.from_pretrained(tmp_path / "export").sample("NV", n=2, guidance_scale=2.0, seed=0)
    assert out.codes.shape == (2, 4, 4)


def test_a_prior_with_another_tokenizer_is_refused(tmp_path: Path) -> None:
    _tokenizer_folder(tmp_path / "export" / "tokenizer", {"vqvae": "other/2"})
    _prior_folder(tmp_path / "export" / "prior")
    _refused(lambda: Generator.from_pretrained(tmp_path / "export" / "prior"), PretrainedError,
             "trained on the codes of VQ-VAE v/1", "is VQ-VAE other/2")


def test_a_prior_without_a_tokenizer_says_how_to_give_one(tmp_path: Path) -> None:
    _prior_folder(tmp_path / "alone" / "prior")
    _refused(lambda: Generator.from_pretrained(tmp_path / "alone" / "prior"), PretrainedError,
             "no tokenizer found", "tokenizer=Tokenizer.from_pretrained")
    tokenizer = Tokenizer.from_pretrained(_tokenizer_folder(tmp_path / "tok"))
    assert Generator.from_pretrained(tmp_path / "alone" / "prior", tokenizer=tokenizer).grid == (4, 4)
