"""The export stage and the models it writes, on the session's tiny finished run with a transformer prior (slow):
the Hugging Face layout and model cards, loading in a fresh process after the run directory moved away (codes equal
to the code shards', samples equal to the sample stage's), the README's Python example as written, and the plan's
line for a prior made by an earlier manifest format."""

from __future__ import annotations

import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest
from helpers import REPO, FinishedRun, assert_ok, copy_run, run_cli, run_pipeline, stage_env

from runtime.files import sha256_file
from runtime.ownership import MARKER

pytestmark = pytest.mark.slow

MODELS = ("tokenizer", "prior", "classifier")
INSTALLED = stage_env(PYTHONPATH=str(REPO))
"""A user's process outside the repository, with lesion-vq importable (as after pip install)."""
STAGE_OF = {"tokenizer": "vqvae", "prior": "prior", "classifier": "classifier"}


@pytest.fixture(scope="module")
def finished(finished_transformer_run: FinishedRun) -> Path:
    """The session's finished tiny run with a transformer prior, and its export (read-only: tests copy it to change
    it)."""
    return finished_transformer_run.run_dir


def test_export_writes_the_hub_layout_with_model_cards(finished: Path) -> None:
    data = json.loads((finished / "data" / "manifest.json").read_text())
    for model in MODELS:
        folder = finished / "export" / model
        assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "README.md"}
        config = json.loads((folder / "config.json").read_text())
        stage = json.loads((finished / STAGE_OF[model] / "manifest.json").read_text())
        # the stage's final weights byte for byte, described by a config that records their hash and lineage
        assert config["weights_sha256"] == sha256_file(folder / "model.safetensors") == stage["weights_sha256"]
        assert config["model_type"] == f"lesion-vq-{model}" and config["lineage"] == stage["lineage"]
        card = (folder / "README.md").read_text()
        assert "license: cc-by-nc-4.0" in card and "CC BY-NC 4.0" in card
        assert re.search(r"[\d,]+ parameters", card)
        counts = data["splits"]
        assert f"| MEL | {counts['train']['class_counts']['MEL']} | {counts['val']['class_counts']['MEL']} |" in card
        assert f"{stage['steps']} optimizer steps" in card and "min wall time" in card
        assert "| fd_samples |" in card and "Not for diagnosis" in card and "## Limitations" in card
    dry = assert_ok(run_pipeline(finished / "config.json", "--dry-run")).stdout
    assert "[export] skip: up to date" in dry


CHECK = """
import io, json, sys
from pathlib import Path
import numpy as np, torch, webdataset as wds
from PIL import Image
from huggingface_hub import PyTorchModelHubMixin
from prior import Generator
from runtime.seeding import derive_seed
from vqvae import Tokenizer

models, run = Path(sys.argv[1]), Path(sys.argv[2])
tokenizer = Tokenizer.from_pretrained(models / "tokenizer")
def tars(folder):
    return sorted(folder.glob("shard-*.tar"))
def read(tar):
    return list(wds.WebDataset(str(tar), shardshuffle=False, empty_check=False))
encoded = 0
for images_tar, codes_tar in zip(tars(run / "data" / "test"), tars(run / "codes" / "test"), strict=True):
    samples = read(images_tar)  # one batch per shard, as the encode stage encodes it
    images = torch.stack([torch.from_numpy(np.array(Image.open(io.BytesIO(s["jpg"])))).permute(2, 0, 1)
                          for s in samples])
    stored = {s["__key__"]: np.load(io.BytesIO(s["codes.npy"]), allow_pickle=False) for s in read(codes_tar)}
    for sample, codes in zip(samples, tokenizer.encode(images), strict=True):
        assert (stored[sample["__key__"]] == codes.numpy()).all(), sample["__key__"]
        encoded += 1
assert encoded == json.loads((run / "data" / "test" / "manifest.json").read_text())["num_samples"]

cfg = json.loads((run / "config.json").read_text())["sample"]
generator = Generator.from_pretrained(models / "prior")
task0 = read(run / "samples" / "shard-000000.tar")
classes = [int(s["cls"]) for s in task0]
seed = derive_seed(cfg["seed"], "sample-task", 0, cfg["num_tasks"])
out = generator.sample(classes, n=1, seed=seed, batch_size=cfg["batch_size"], temperature=cfg["temperature"],
                       top_k=cfg["top_k"], top_p=cfg["top_p"], guidance_scale=cfg["guidance_scale"])
for sample, codes, image in zip(task0, out.codes, out.images, strict=True):
    assert (np.load(io.BytesIO(sample["codes.npy"]), allow_pickle=False) == codes.numpy()).all()
    png = np.array(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
    assert (png == image.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()).all()
assert torch.equal(generator.sample(classes, n=1, seed=seed).codes, generator.sample(classes, n=1, seed=seed).codes)
hub = PyTorchModelHubMixin.from_pretrained.__func__(Generator, models / "prior")
assert torch.equal(hub.sample(classes, n=1, seed=seed).codes, generator.sample(classes, n=1, seed=seed).codes)
print("encoded", encoded, "sampled", len(task0))
"""


def test_exported_models_load_in_a_fresh_process_after_the_run_moved(finished: Path, tmp_path: Path) -> None:
    run = copy_run(finished, tmp_path / "run")
    shutil.copytree(run / "export", tmp_path / "models")
    moved = run.rename(tmp_path / "moved")  # nothing of the run is where it was made
    script = tmp_path / "check.py"
    script.write_text(CHECK)
    result = assert_ok(run_cli(script, tmp_path / "models", moved, cwd=tmp_path, env=INSTALLED))
    encoded, sampled = re.search(r"encoded (\d+) sampled (\d+)", result.stdout).groups()
    assert int(encoded) > 0 and int(sampled) > 0


def test_the_readme_python_example_runs_as_written(finished: Path, tmp_path: Path) -> None:
    text = (REPO / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert len(block.strip().splitlines()) <= 12
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "smoke").symlink_to(finished, target_is_directory=True)
    jpg = next((finished / "data" / "test").glob("shard-*.tar"))
    with tarfile.open(jpg) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        (tmp_path / "lesion.jpg").write_bytes(tar.extractfile(member).read())
    (tmp_path / "example.py").write_text(block + "print(codes.shape, images.shape, samples.images.shape)\n")
    result = assert_ok(run_cli(tmp_path / "example.py", cwd=tmp_path, env=INSTALLED))
    assert "torch.Size([4, 3, 32, 32])" in result.stdout, result.stdout


def test_a_prior_of_the_earlier_manifest_format_is_remade_saying_so(finished: Path, tmp_path: Path) -> None:
    run = copy_run(finished, tmp_path / "run")
    old_identity = "0123456789abcdef"  # v2 hashed the format and every arch's settings: another identity
    for name, update in (("manifest.json", {"format": "lesion-vq/prior/v2", "identity": old_identity}),
                         (MARKER, {"identity": old_identity})):
        path = run / "prior" / name
        path.write_text(json.dumps({**json.loads(path.read_text()), **update}))
    dry = assert_ok(run_pipeline(run / "config.json", "--dry-run")).stdout
    line = next(line for line in dry.splitlines() if line.startswith("[prior]"))
    assert line.startswith("[prior] run: made by an earlier lesion-vq (manifest lesion-vq/prior/v2, now "
                           "lesion-vq/prior/v3: a prior's identity now hashes only its own arch's settings"), line
    for stage in ("sample", "evaluate", "export"):
        assert f"[{stage}] run: upstream" in dry, dry
    assert "[vqvae] skip: up to date" in dry  # the VQ-VAE is kept
