"""The judge: Fréchet distance against closed forms, and the evaluate stage deterministic and cached
by lineage (a changed prior re-evaluates but never retrains the classifier)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from helpers import FinishedRun, assert_one_line_error, copy_run, run_cli, run_pipeline, tiny_config
from PIL import Image

from judge.classifier import frechet_distance, mix_weights
from runtime.balance import class_allocation, class_weights
from runtime.errors import UserError


def test_frechet_distance_matches_closed_forms() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=gen, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shifted = a + torch.tensor([3.0, 0.0, 4.0], dtype=torch.float64)
    assert frechet_distance(a, shifted) == pytest.approx(25.0, abs=1e-6)  # |shift|^2, same covariance
    # b = 3a: C_b = 9 C_a, (C_a C_b)^1/2 = 3 C_a, so FD = |2 mu_a|^2 + (1 + 9 - 6) tr(C_a).
    scaled = a * 3
    expected = float((2 * a.mean(0)).pow(2).sum() + 4 * torch.cov(a.T).trace())
    assert frechet_distance(a, scaled) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a[:1], a)


def test_weighted_frechet_distance_and_mix_weights() -> None:
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(300, 4, generator=gen), torch.randn(200, 4, generator=gen) + 0.5
    assert frechet_distance(a, b, torch.ones(300)) == pytest.approx(frechet_distance(a, b), rel=1e-9)
    keep = torch.arange(300) % 3 == 0  # weight 0 drops a row: the distance of the rows left
    assert frechet_distance(a, b, keep.double()) == pytest.approx(frechet_distance(a[keep], b), rel=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a, b, (torch.arange(300) == 0).double())
    # Weights on both sides (the perfect-prior floor weighs real images and their reconstructions alike).
    pick = torch.arange(200) % 2 == 0
    assert frechet_distance(a, b, keep.double(), pick.double()) == pytest.approx(
        frechet_distance(a[keep], b[pick]), rel=1e-9)
    assert frechet_distance(b, a, pick.double(), keep.double()) == pytest.approx(
        frechet_distance(a, b, keep.double(), pick.double()), rel=1e-6)
    # Samples drawn 1:1 (and some of class 2), real images 3:1: weighted, the samples take the real mix.
    drawn, real = torch.tensor([0, 1, 0, 1, 2, 2]), torch.tensor([0, 0, 0, 1])
    weights = mix_weights(drawn, real)
    assert float(weights[drawn == 0].sum()) == pytest.approx(3 * float(weights[drawn == 1].sum()))
    assert float(weights[drawn == 2].sum()) == 0.0 and float(weights.sum()) == pytest.approx(len(drawn))


@pytest.mark.slow
def test_samples_weighted_to_the_real_mix_measure_the_per_class_model_not_the_mix() -> None:
    """A perfect class-conditional model drawn 1:1 against real images 9:1: unweighted, the Fréchet distance
    sees the class mix; with the samples weighted to the real mix it is the finite-sample noise only."""
    from judge.evaluate import _fd_samples
    from runtime.config import build_config

    gen = torch.Generator().manual_seed(3)
    centre = torch.tensor([[0.0, 0.0], [6.0, 0.0]])
    real_labels = (torch.arange(4000) % 10 == 0).long()
    sample_labels = torch.arange(4000) % 2
    real = centre[real_labels] + torch.randn(4000, 2, generator=gen)
    samples = centre[sample_labels] + torch.randn(4000, 2, generator=gen)
    cfg = build_config("smoke", [])
    assert cfg.prior.conditional
    weighted = _fd_samples(cfg, real, real_labels, samples, sample_labels)
    plain = frechet_distance(real, samples)
    assert weighted < 0.05 and plain > 3  # the mix: a mean shift of 2.4 along x, and a wider spread
    # Without real labels (unlabelled --images) or for an unconditional prior nothing is weighted.
    assert _fd_samples(cfg, real, None, samples, sample_labels) == pytest.approx(plain)
    seed = build_config("seed", [])
    assert _fd_samples(seed, real, real_labels, samples, sample_labels) == pytest.approx(plain)


def test_class_allocation_follows_the_train_mix_with_a_minimum() -> None:
    counts = {"MEL": 890, "NV": 5230, "BCC": 410, "AKIEC": 260, "BKL": 880, "DF": 90, "VASC": 0}
    where = Path("codes/manifest.json")
    alloc = class_allocation(counts, 700, 20, where)
    assert sum(alloc) == 700 and alloc[6] == 0 and min(alloc[:6]) >= 20
    assert alloc[1] == max(alloc) and alloc[1] > 400  # NV keeps its share of what is left after the minimum
    spare = 700 - 6 * 20
    for i, name in enumerate(("MEL", "NV", "BCC", "AKIEC", "BKL", "DF")):
        assert abs(alloc[i] - 20 - spare * counts[name] / 7760) < 1  # largest remainder: within one of the share
    assert class_allocation(counts, 700, 0, where) == class_allocation(counts, 700, 0, where)  # deterministic
    assert class_allocation({"NV": 3, "MEL": 1}, 5, 1, where) == [2, 3, 0, 0, 0, 0, 0]
    with pytest.raises(UserError, match=r"min_per_class=200 exceed"):
        class_allocation(counts, 700, 200, where)
    with pytest.raises(UserError, match=r"codes/manifest\.json"):
        class_allocation({"NV": -3}, 700, 1, where)


def test_class_weights_make_every_class_weigh_the_same() -> None:
    counts = {"MEL": 100, "NV": 700, "BCC": 50, "AKIEC": 30, "BKL": 110, "DF": 10, "VASC": 0}
    n = torch.tensor([100, 700, 50, 30, 110, 10, 0], dtype=torch.float32)
    inverse = class_weights(counts, "inverse", Path("m.json"))
    totals = inverse * n  # each present class's share of the summed loss weight
    assert torch.allclose(totals[:6], totals[0].expand(6)) and inverse[6] == 0  # absent class: weight 0
    assert float((inverse * n).sum() / n.sum()) == pytest.approx(1.0)  # mean weight over the samples: 1
    sqrt = class_weights(counts, "sqrt", Path("m.json"))
    assert float(sqrt[5] / sqrt[1]) == pytest.approx((700 / 10) ** 0.5, rel=1e-5)
    assert torch.equal(class_weights(counts, "none", Path("m.json"))[:6], torch.ones(6))
    for bad in ({"NV": -1}, {"NV": 2.5}, {"NV": True}, {}):
        with pytest.raises(UserError, match=r"m\.json"):
            class_weights(bad, "inverse", Path("m.json"))


def test_balanced_judge_loss_weights_each_sample_by_its_class() -> None:
    from judge.train import ClassifierTask
    from runtime.config import build_config

    torch.manual_seed(0)
    weights = torch.tensor([2.0, 0.5, 1, 1, 1, 1, 1])
    task = ClassifierTask(build_config("smoke", []), Path("val"), weights)
    model = task.build_model()
    batch = {"image": torch.rand(4, 3, 32, 32), "label": torch.tensor([0, 1, 1, 0])}
    loss, _ = task.loss(model, batch)
    per_sample = torch.nn.functional.cross_entropy(model(batch["image"]), batch["label"], reduction="none")
    assert float(loss) == pytest.approx(float((per_sample * weights[batch["label"]]).mean()), rel=1e-5)
    empty = {"image": torch.rand(0, 3, 32, 32), "label": torch.zeros(0, dtype=torch.long)}
    assert float(task.loss(model, empty)[0]) == 0.0


@pytest.mark.slow
def test_evaluate_is_deterministic_and_the_classifier_is_cached_by_lineage(tmp_path: Path,
                                                                          finished_run: Path) -> None:
    run_dir = copy_run(finished_run, tmp_path / "run")
    config = run_dir / "config.json"
    metrics = json.loads((run_dir / "evaluate" / "manifest.json").read_text())["metrics"]
    for key in ("classifier_val_accuracy", "classifier_val_balanced_accuracy", "fd_reconstructions", "fd_samples",
                "fd_real_train_floor", "fd_samples_floor", "classifier_recon_balanced_accuracy",
                "sample_class_agreement", "recon_psnr"):
        assert isinstance(metrics[key], float) and metrics[key] == metrics[key], key  # present, not NaN
    assert metrics["fd_reconstructions"] >= 0 and metrics["fd_samples"] >= 0 and metrics["fd_samples_floor"] >= 0
    assert 0 <= metrics["classifier_recon_balanced_accuracy"] <= 1
    assert set(metrics["sample_class_agreement_per_class"]) <= {"MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"}

    again = run_pipeline(config, "--only", "evaluate")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run_dir / "evaluate" / "manifest.json").read_text())["metrics"] == metrics

    weights = (run_dir / "classifier" / "final" / "model.safetensors").read_bytes()
    changed = run_pipeline(config, "sample.temperature=0.9")  # new samples: evaluate again, the judge is kept
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert "stage classifier: skip: up to date" in changed.stderr
    assert "stage evaluate: run: upstream sample is re-made first" in changed.stderr
    assert (run_dir / "classifier" / "final" / "model.safetensors").read_bytes() == weights
    assert "Evaluation" in (run_dir / "report" / "report.html").read_text()


# ----- evaluate --images: another image set judged with a finished run -----------------------------------
HAM = SHARED_DATA / "ham10000-200x150"
SAMPLE = SHARED_DATA / "isic-sample"
IMAGES_KEYS = ("recon_psnr", "recon_ssim", "recon_mse", "fd_reconstructions", "fd_samples", "fd_samples_floor")


@pytest.fixture(scope="module")
def finished_run(finished_run: FinishedRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the session's finished run (its samples in the data's class mix), for this module's tests to
    judge with: they write only its judged/ folder."""
    return copy_run(finished_run.run_dir, tmp_path_factory.mktemp("judged") / "run")


@pytest.mark.slow
def test_samples_in_the_data_mix_follow_the_train_split(finished_run: Path) -> None:
    """class_mix=data: the sample stage drew its classes as the codes' train split holds them (every class
    at least once), and every sample's stored class is the one it was drawn for."""
    import webdataset as wds

    codes = json.loads((finished_run / "codes" / "manifest.json").read_text())
    samples = json.loads((finished_run / "samples" / "manifest.json").read_text())
    expected = class_allocation(codes["splits"]["train"]["class_counts"], 2 * 7, 1, Path("m"))
    assert list(samples["class_counts"].values()) == expected and samples["class_mix"] == "data"
    drawn = [int(s["cls"]) for s in wds.WebDataset([str(finished_run / "samples" / m["name"])
                                                    for m in samples["shards"]], shardshuffle=False)]
    assert sorted(drawn) == [c for c, n in enumerate(expected) for _ in range(n)]
    assert (finished_run / "samples" / "samples.png").is_file()


JUDGE = ("-m", "judge.evaluate")
"""``run_cli(*JUDGE, ...)``: the judge's command line."""


def _image_set(folder: Path) -> Path:
    """A folder of real lesion images of two sizes (600x450 and 200x150) plus a PNG copy at another size, a
    corrupt JPEG and a text file, and its HAM10000-layout CSV; synthetic PNGs when the shared data is absent."""
    folder.mkdir()
    rows = ["lesion_id,image_id,dx"]
    sources = sorted((SAMPLE / "images").glob("*.jpg"))[:2] + sorted((HAM / "images").glob("*.jpg"))[:4]
    if len(sources) == 6:
        labels = {r.split(",")[1]: r.split(",")[2] for p in (SAMPLE, HAM)
                  for r in (p / "HAM10000_metadata.csv").read_text().splitlines()[1:]}
        for src in sources:
            shutil.copy(src, folder / src.name)
            rows.append(f"L_{src.stem},{src.stem},{labels[src.stem]}")
        Image.open(sources[0]).resize((333, 211)).save(folder / "copy_png.png")
    else:
        gen = np.random.default_rng(0)
        for i, (size, dx) in enumerate([((600, 450), "mel"), ((200, 150), "nv"), ((64, 64), "bkl")] * 2):
            Image.fromarray(gen.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"img_{i}.png")
            rows.append(f"L_{i},img_{i},{dx}")
        Image.fromarray(gen.integers(0, 256, (211, 333, 3), dtype=np.uint8)).save(folder / "copy_png.png")
    rows.append("L_copy,copy_png,mel")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows.append("L_broken,broken,nv")
    (folder / "notes.txt").write_text("not an image\n")
    (folder.parent / f"{folder.name}.csv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.mark.slow
def test_evaluate_images_judges_any_folder_with_the_runs_models(tmp_path: Path, finished_run: Path) -> None:
    images = _image_set(tmp_path / "private")
    csv = tmp_path / "private.csv"
    classifier = (finished_run / "classifier" / "final" / "model.safetensors").read_bytes()
    stages_before = sorted(p.name for p in finished_run.iterdir())

    labelled = run_cli(*JUDGE, "--run-dir", finished_run, "--images", images, "--csv", csv,
                       "--out", tmp_path / "a.json")
    assert labelled.returncode == 0, labelled.stderr[-3000:]
    assert "reconstruction PSNR" in labelled.stdout and "classifier accuracy" in labelled.stdout
    result = json.loads((tmp_path / "a.json").read_text())
    metrics = result["metrics"]
    for key in (*IMAGES_KEYS, "classifier_accuracy", "classifier_balanced_accuracy",
                "classifier_recon_balanced_accuracy"):
        assert isinstance(metrics[key], float) and np.isfinite(metrics[key]), key
    assert 0 <= metrics["classifier_accuracy"] <= 1 and metrics["fd_reconstructions"] >= 0
    assert result["images_judged"] == 7 and result["labelled"] and sum(result["class_counts"].values()) == 7
    assert {s["kind"] for s in result["skipped"]} == {"unreadable", "not_an_image"}  # broken.jpg, notes.txt

    # The same inputs give the same numbers; the default output is a marked folder inside the run.
    again = run_cli(*JUDGE, "--config", finished_run / "config.json", "--images", images, "--csv", csv)
    assert again.returncode == 0, again.stderr[-3000:]
    (written,) = (finished_run / "judged").glob("private-*.json")
    assert json.loads(written.read_text())["metrics"] == metrics
    assert json.loads((finished_run / "judged" / ".lesion-vq.json").read_text())["owner"] == "lesion-vq"

    unlabelled = run_cli(*JUDGE, "--run-dir", finished_run, "--images", images, "--out", tmp_path / "b.json")
    assert unlabelled.returncode == 0, unlabelled.stderr[-3000:]
    plain = json.loads((tmp_path / "b.json").read_text())
    assert not plain["labelled"] and "classifier_accuracy" not in plain["metrics"]
    # Labels change only the sample distance: the samples are then weighed to the real images' class mix.
    recon_keys = [k for k in IMAGES_KEYS if k != "fd_samples"]
    assert {k: plain["metrics"][k] for k in recon_keys} == {k: metrics[k] for k in recon_keys}
    assert plain["metrics"]["fd_samples"] != metrics["fd_samples"] and np.isfinite(plain["metrics"]["fd_samples"])

    # Nothing retrained or added besides judged/.
    assert (finished_run / "classifier" / "final" / "model.safetensors").read_bytes() == classifier
    assert sorted(p.name for p in finished_run.iterdir()) == sorted([*stages_before, "judged"])


@pytest.mark.slow
def test_evaluate_images_refuses_bad_input_in_one_line(tmp_path: Path, finished_run: Path) -> None:
    images = _image_set(tmp_path / "private")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"garbage")
    (broken / "b.png").write_bytes(b"")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    tiny_config(unfinished)
    other_csv = tmp_path / "other.csv"
    other_csv.write_text("lesion_id,image_id,dx\nL_x,ISIC_9999999,mel\n")
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": true}\n')
    run = ("--run-dir", finished_run)

    assert_one_line_error(run_cli(*JUDGE, *run, "--images", tmp_path / "missing"), "does not exist")
    assert_one_line_error(run_cli(*JUDGE, *run, "--images", broken), "0 readable image(s)")
    assert_one_line_error(run_cli(*JUDGE, "--run-dir", unfinished, "--images", images), "has not completed")
    assert_one_line_error(run_cli(*JUDGE, *run, "--images", images, "--csv", other_csv), "no usable labelled images")
    assert_one_line_error(run_cli(*JUDGE, *run, "--images", images, "--out", foreign),
                          "is not an evaluation lesion-vq wrote")
    assert foreign.read_text() == '{"mine": true}\n'
    assert_one_line_error(run_cli(*JUDGE, "--images", images), "--run-dir")


@pytest.mark.slow
def test_bench_quality_judges_every_run_on_the_test_split_originals(tmp_path: Path, finished_run: Path) -> None:
    """``bench quality``'s held-out judgement: ROOT/held-out links exactly the originals of the packed test
    split (not those of train or val), and each run is judged on them by ``judge.evaluate --images``."""
    from bench.quality import _held_out_images, _judge_held_out
    from runtime.config import CLASSES
    from shards.loader import make_eval_loader

    originals, rows, keys = tmp_path / "originals", ["lesion_id,image_id,dx"], {}
    originals.mkdir()
    for split in ("train", "val", "test"):  # every split's images, as the folder packing read would hold them
        keys[split] = []
        for batch in make_eval_loader(finished_run / "data" / split, batch_size=64):
            for key, image, label in zip(batch["key"], batch["image"], batch["label"], strict=True):
                pixels = (image.permute(1, 2, 0) * 255).round().byte().numpy()
                Image.fromarray(pixels).save(originals / f"{key}.png")
                rows.append(f"L_{key},{key},{CLASSES[int(label)].lower()}")
                keys[split].append(key)
    csv = tmp_path / "meta.csv"
    csv.write_text("\n".join(rows) + "\n")
    assert len(keys["test"]) >= 2
    root = tmp_path / "root"
    root.mkdir()
    (root / "ham128").symlink_to(finished_run, target_is_directory=True)

    held = _judge_held_out(root, ["ham128"], originals, csv)
    linked = sorted(p.stem for p in (root / "held-out").iterdir())
    assert linked == sorted(keys["test"])
    assert all((root / "held-out" / f"{k}.png").resolve() == (originals / f"{k}.png").resolve() for k in linked)
    judged = json.loads((root / "held-out-ham128.json").read_text())
    assert judged["images_judged"] == len(keys["test"]) == held["ham128"]["images_judged"]
    for key in ("recon_psnr", "fd_reconstructions", "fd_samples", "fd_samples_floor", "classifier_balanced_accuracy"):
        assert held["ham128"][key] == judged["metrics"][key] and np.isfinite(held["ham128"][key]), key

    (originals / f"{keys['test'][0]}.png").unlink()  # packed from another folder: one line, not a KeyError
    other = tmp_path / "other"
    other.mkdir()
    (other / "ham128").symlink_to(finished_run, target_is_directory=True)
    with pytest.raises(SystemExit) as stopped:
        _held_out_images(other, originals)
    assert f"test-split image {keys['test'][0]} is not in {originals}" in str(stopped.value.code)
