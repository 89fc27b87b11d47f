"""The augment stage (judge/augment.py) and its statistics (judge/comparison.py): scores on known inputs, the
batched bootstrap against torchmetrics, paired differences, config validation, the colour-jitter decoder; slow:
the smoke pipeline's augment stage, its table in the report, and that no training saw a test image."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FinishedRun
from PIL import Image

from judge.augment import JitteredDecoder
from judge.comparison import class_scores, paired_differences, resampled_scores, summarise_arm
from runtime.config import CLASSES, ConfigError, build_config
from runtime.stages import STAGES
from shards.loader import ImageDecoder


def _noisy(truth: torch.Tensor, right: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    wrong = torch.randint(len(CLASSES), truth.shape, generator=gen)
    return torch.where(torch.rand(truth.shape, generator=gen) < right, truth, wrong)


def test_class_scores_on_known_inputs() -> None:
    truth = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    guesses = torch.tensor([0, 0, 0, 1, 1, 0, 2, 2])
    s = class_scores(guesses, truth)
    # recall: MEL 3/4, NV 1/2, BCC 2/2; precision: MEL 3/4, NV 1/2, BCC 1 -> F1 0.75, 0.5, 1.
    assert s["recall"] == pytest.approx({"MEL": 0.75, "NV": 0.5, "BCC": 1.0})
    assert s["f1"] == pytest.approx({"MEL": 0.75, "NV": 0.5, "BCC": 1.0})
    assert s["balanced_accuracy"] == pytest.approx(0.75)  # classes absent from the truth do not count
    assert s["macro_f1"] == pytest.approx(0.75)
    assert class_scores(truth, truth)["macro_f1"] == pytest.approx(1.0)
    # A class guessed but absent from the truth lowers the F1 of the class it was taken from.
    assert class_scores(torch.tensor([3, 0, 0, 0, 1, 1, 2, 2]), truth)["f1"]["MEL"] == pytest.approx(6 / 7)


def test_batched_bootstrap_scores_equal_torchmetrics() -> None:
    truth = torch.randint(len(CLASSES), (200,), generator=torch.Generator().manual_seed(0))
    models = torch.stack([_noisy(truth, p, seed) for seed, p in enumerate((0.2, 0.5, 0.9))])
    picks = torch.randint(200, (5, 200), generator=torch.Generator().manual_seed(1))
    batched = resampled_scores(models, truth, picks)
    for m in range(3):
        for b in range(5):
            expected = class_scores(models[m, picks[b]], truth[picks[b]])
            assert float(batched["balanced_accuracy"][m, b]) == pytest.approx(expected["balanced_accuracy"])
            assert float(batched["macro_f1"][m, b]) == pytest.approx(expected["macro_f1"])


def test_paired_differences_are_seeded_and_paired() -> None:
    truth = torch.randint(len(CLASSES), (300,), generator=torch.Generator().manual_seed(2))
    weak = torch.stack([_noisy(truth, 0.3, s) for s in range(3)])
    strong = torch.stack([_noisy(truth, 0.8, 10 + s) for s in range(3)])
    guesses = {"real": weak, "synthetic": strong, "augmented": weak.clone()}
    pairs = [("synthetic", "real"), ("real", "augmented")]
    first = paired_differences(guesses, truth, pairs, 400, 0.95, seed=7)
    assert first == paired_differences(guesses, truth, pairs, 400, 0.95, seed=7)  # deterministic
    assert first != paired_differences(guesses, truth, pairs, 400, 0.95, seed=8)
    gain = first["synthetic - real"]["balanced_accuracy"]
    expected = np.mean([class_scores(strong[s], truth)["balanced_accuracy"] - class_scores(weak[s], truth)[
        "balanced_accuracy"] for s in range(3)])
    assert gain["estimate"] == pytest.approx(expected)
    assert 0 < gain["ci"][0] < gain["estimate"] < gain["ci"][1]
    same = first["real - augmented"]["macro_f1"]  # identical models: no difference on any resample
    assert same["estimate"] == 0 and same["ci"] == [0.0, 0.0]


def test_summarise_arm_mean_and_std_over_seeds() -> None:
    per_seed = [{"balanced_accuracy": v, "macro_f1": v / 2, "recall": {"MEL": v}, "f1": {"MEL": 1.0}}
                for v in (0.4, 0.6, 0.8)]
    s = summarise_arm(per_seed)
    assert s["balanced_accuracy"]["mean"] == pytest.approx(0.6)
    assert s["balanced_accuracy"]["std"] == pytest.approx(0.2)
    assert s["macro_f1"]["per_seed"] == [0.2, 0.3, 0.4]
    assert s["f1"]["MEL"]["std"] == 0
    assert summarise_arm(per_seed[:1])["balanced_accuracy"]["std"] == 0.0


@pytest.mark.parametrize(("override", "needle"), [
    ('augment.classes=["DF","DF"]', "twice"), ('augment.classes=["SCC"]', "augment.classes"),
    ("augment.classes=[]", "augment.classes"), ("augment.seeds=0", "augment.seeds"),
    ("augment.bootstrap=10", "augment.bootstrap"), ("augment.confidence=1", "augment.confidence"),
    ("augment.jitter=1.5", "augment.jitter"), ("sample.class_mix=top_up", "top_up_to"),
])
def test_bad_augment_settings_are_refused(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        build_config("smoke", [override])


def test_augment_is_one_stage_after_evaluate_and_read_by_the_report() -> None:
    names = [s.name for s in STAGES]
    assert names.count("augment") == 1 and names.index("evaluate") < names.index("augment")
    augment = STAGES[names.index("augment")]
    assert set(augment.upstream) == {"data", "sample"}  # never the judge (the classifier stage)
    assert "augment" in STAGES[names.index("report")].upstream


def _jpeg_sample(seed: int) -> dict[str, bytes]:
    pixels = np.random.default_rng(seed).integers(40, 220, (16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return {"jpg": buf.getvalue(), "cls": b"3"}


def test_colour_jitter_is_deterministic_per_sample_and_epoch() -> None:
    inner = ImageDecoder(16, augment=True, seed=5)
    jittered = JitteredDecoder(inner, 0.3)
    members = _jpeg_sample(0)
    once = jittered("a", members, 0)["image"]
    assert torch.equal(once, jittered("a", members, 0)["image"])
    assert not torch.equal(once, jittered("a", members, 1)["image"])  # another epoch, other draws
    assert not torch.equal(once, inner("a", members, 0)["image"])  # the colours changed
    assert once.min() >= 0 and once.max() <= 1
    assert torch.equal(JitteredDecoder(inner, 0.0)("a", members, 0)["image"], inner("a", members, 0)["image"])


# ----- the smoke pipeline's augment stage ---------------------------------------------------------------
def _keys(split: Path) -> set[str]:
    manifest = json.loads((split / "manifest.json").read_text())
    keys = set()
    for shard in manifest["shards"]:
        with tarfile.open(split / shard["name"]) as tar:
            keys |= {m.name.split(".", 1)[0] for m in tar.getmembers()}
    return keys


@pytest.mark.slow
def test_pipeline_runs_augment_and_reports_it(finished_run: FinishedRun) -> None:
    run = finished_run.run_dir
    manifest = json.loads((run / "augment" / "manifest.json").read_text())
    assert set(manifest["arms"]) == {"real", "synthetic", "augmented"}
    assert len(manifest["seeds"]) == 3 and manifest["cost"]["trainings"] == 9
    for arm in manifest["arms"].values():
        assert len(arm["balanced_accuracy"]["per_seed"]) == 3 and 0 <= arm["macro_f1"]["mean"] <= 1
    for pair in ("synthetic - real", "synthetic - augmented"):
        diff = manifest["differences"][pair]["balanced_accuracy"]
        assert diff["ci"][0] <= diff["estimate"] <= diff["ci"][1]
    dataset = json.loads((run / "samples" / "manifest.json").read_text())["dataset"]
    assert sum(manifest["synthetic_added"].values()) == len(manifest["synthetic_images"]) == dataset["num_images"]
    assert manifest["train_images"]["synthetic"] == manifest["train_images"]["real"] + dataset["num_images"]
    assert manifest["test_images"] == json.loads((run / "data" / "test" / "manifest.json").read_text())["num_samples"]
    assert manifest["lineage"]["sample"] == manifest["upstream"]["sample"]  # which samples: lineage + their ids
    report = (run / "report" / "report.html").read_text()
    assert "Do synthetic lesions help a classifier?" in report
    assert "synthetic - real" in report and "balanced accuracy" in report


@pytest.mark.slow
def test_no_training_saw_a_test_image(finished_run: FinishedRun) -> None:
    """Every training stage's manifest names what it trained on: train splits only; synthetic images were
    packed into a train split only, and no test image's id is in any split a training read."""
    run = finished_run.run_dir
    trainings = [run / name for name in ("vqvae", "prior", "classifier")] + sorted(
        p for p in (run / "augment").iterdir() if p.name.rsplit("-seed", 1)[-1].isdigit())
    assert len(trainings) == 3 + 9
    test_keys = _keys(run / "data" / "test")
    assert test_keys
    for folder in trainings:
        trained_on = json.loads((folder / "manifest.json").read_text())["trained_on"]
        assert trained_on and all(Path(t).name == "train" for t in trained_on), (folder, trained_on)
        for split in trained_on:
            assert not test_keys & _keys(run / split), (folder, split)
    synthetic = json.loads((run / "augment" / "synthetic" / "shards" / "manifest.json").read_text())
    assert synthetic["splits"]["val"]["num_samples"] == synthetic["splits"]["test"]["num_samples"] == 0
    assert any("augment/synthetic/shards/train" in t for f in trainings
               for t in json.loads((f / "manifest.json").read_text())["trained_on"])


@pytest.mark.slow
def test_finished_classifiers_judge_another_labelled_set(finished_run: FinishedRun, capsys: pytest.CaptureFixture[str],
                                                         tmp_path: Path) -> None:
    """``--images DIR --csv CSV``: the stage's nine classifiers on other labelled images (here the run's own
    synthetic data set), the same table, nothing written."""
    from judge.augment import judge_images
    from runtime.config import load_config

    run = finished_run.run_dir
    dataset = run / "samples" / "dataset"
    before = sorted(p.name for p in (run / "augment").iterdir())
    result = judge_images(load_config(finished_run.config), dataset / "images", dataset / "metadata.csv")
    rows = (dataset / "metadata.csv").read_text().strip().splitlines()[1:]
    assert result["test_images"] == len(rows)
    assert list(result["arms"]) == ["real", "synthetic", "augmented"]
    assert "synthetic - augmented" in capsys.readouterr().out
    assert sorted(p.name for p in (run / "augment").iterdir()) == before
