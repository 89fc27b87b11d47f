"""``python -m bench quality``'s tokenizer comparison (issue 30) without training: the ``--variants`` with the new
tokenizer options (alone and joined by ``+``) are valid ham128 runs timed by the training stage's own step, code
usage and perplexity come from real code shards, and each tokenizer's verdict follows the issue's targets."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers import code_manifest, npy_bytes, write_split

from bench.quality import (
    _rows,
    _run_configs,
    _step_seconds,
    _training_step,
    _variant,
    code_usage,
    main,
    timed_steps,
    tokenizer_verdicts,
    with_overrides,
)
from runtime.config import build_config


def _args(variants: list[str]) -> argparse.Namespace:
    return argparse.Namespace(images=Path("/data/images"), csv=Path("/data/meta.csv"), prior_steps=100,
                              classifier_steps=100, per_class=2, variants=variants)


def test_new_tokenizer_options_are_variants_and_combine_with_plus() -> None:
    runs = _run_configs(_args(["cosine", "rotation", "patch", "cosine+rotation+patch"]))
    cosine = build_config(*runs["ham128-cosine"]).vqvae
    assert cosine.quantizer.kind == "ema" and cosine.quantizer.lookup_dim == 8
    assert not cosine.quantizer.rotation_trick
    assert build_config(*runs["ham128-rotation"]).vqvae.quantizer.rotation_trick
    patch = build_config(*runs["ham128-patch"])
    assert patch.vqvae.quantizer.kind == "fsq" and patch.vqvae.patch_size == 4  # ham128's FSQ, a cheap stem
    assert patch.data.image_size // patch.downsample_factor == 16  # the same 16x16 grid as ham128
    both = build_config(*runs["ham128-cosine+rotation+patch"]).vqvae
    assert (both.quantizer.kind, both.quantizer.lookup_dim, both.quantizer.rotation_trick, both.patch_size) == \
        ("ema", 8, True, 4)


@pytest.mark.parametrize("bad", ["cosine+nope", "cosine+cosine", "fsq"])
def test_unknown_or_repeated_variant_is_refused(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="allowed: ema, adversarial, cosine"):
        _variant(bad)
    with pytest.raises(SystemExit) as stopped:
        main(["--variants", bad])
    assert stopped.value.code == 2 and "unknown or repeated variant" in capsys.readouterr().err


def test_new_variants_are_timed_by_a_real_training_step() -> None:
    """The equal-time budget divides by these seconds: each variant's step runs the stage's own loss on its
    model (here at 32 px, batch 2)."""
    new = ["cosine", "rotation", "patch", "cosine+rotation+patch"]
    runs = _run_configs(_args(new))
    steps = {name: _training_step(build_config(runs[f"ham128-{name}"][0], [*runs[f"ham128-{name}"][1],
                                                                           "vqvae_train.batch_size=2",
                                                                           "data.image_size=32"]), critic=False)
             for name in new}
    seconds = _step_seconds(steps, rounds=1)
    assert set(seconds) == set(new) and all(value > 0 for value in seconds.values())


def test_code_usage_and_perplexity_of_an_encoded_split(tmp_path: Path) -> None:
    grids = [np.array([[0, 0], [1, 2]]), np.array([[0, 1], [2, 3]])]  # codes 0..3 of 8: 3, 2, 2, 1 times
    write_split(tmp_path / "codes" / "test", [
        {"__key__": f"img_{i}", "codes.npy": npy_bytes(grid.astype(np.int16)), "cls": b"1", "json": b"{}"}
        for i, grid in enumerate(grids)], **code_manifest(8, 2))
    usage = code_usage(tmp_path, 8, "test")
    probs = np.array([3, 2, 2, 1]) / 8
    assert usage["codes_used"] == 0.5
    assert usage["perplexity"] == pytest.approx(math.exp(-(probs * np.log(probs)).sum()))


def test_rows_carry_perplexity_and_steps_per_second_against_seed() -> None:
    values = {"perplexity": 100.0, "vqvae_steps_per_s": 2.0, "codes_used": 0.5}
    rows = {r.name: r for r in _rows({"seed": values, "ham128-cosine": values}, "held out: ",
                                     ("perplexity", "codes_used", "vqvae_steps_per_s"))}
    assert rows["held out: ham128-cosine: perplexity"].baseline == "held out: seed: perplexity"
    assert rows["held out: ham128-cosine: vqvae_steps_per_s"].unit == "steps/s"


def test_tokenizer_verdicts_follow_issue_30() -> None:
    seed = {"recon_psnr": 24.0, "fd_reconstructions": 1.0, "codes_used": 0.46, "perplexity": 106.0,
            "fd_samples_floor": 1.5}
    good = {"recon_psnr": 25.6, "fd_reconstructions": 0.7, "codes_used": 0.96, "perplexity": 400.0,
            "fd_samples_floor": 1.4}
    held = {"seed": seed, "ham128": seed | {"recon_psnr": 23.0}, "ham128-gated": good, "ham128-cosine": good,
            "ham128-patch": good | {"codes_used": 0.94}, "ham128-rotation": good | {"fd_samples_floor": 1.6},
            "ham128-cosine+patch": good | {"recon_psnr": 25.4}}
    lines = {line.split(" ")[1]: line for line in tokenizer_verdicts(held)}
    assert set(lines) == {"ham128", "ham128-cosine", "ham128-patch", "ham128-rotation", "ham128-cosine+patch"}
    assert lines["ham128-cosine"].endswith("MET") and "+1.60 dB PSNR, recon FD x0.70, 96% of codes" in \
        lines["ham128-cosine"]
    for name in ("ham128", "ham128-patch", "ham128-rotation", "ham128-cosine+patch"):
        assert lines[name].endswith("MISSED"), lines[name]


def test_set_overrides_reach_every_run_and_a_bad_one_is_one_line(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    runs = with_overrides(_run_configs(_args(["cosine"])), ["encode.train_views=1"])
    assert all(build_config(*run).encode.train_views == 1 for run in runs.values())
    (tmp_path / "images").mkdir()
    (tmp_path / "meta.csv").write_text("lesion_id,image_id,dx\n")
    with pytest.raises(SystemExit) as stopped:
        main(["--root", str(tmp_path / "root"), "--images", str(tmp_path / "images"), "--csv",
              str(tmp_path / "meta.csv"), "--set", "encode.train_views=3"])
    err = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and "\n" not in err and err.startswith("error: --set: ") and "train_views" in err
    assert not (tmp_path / "root").exists()  # refused before anything was made


def test_a_rerun_on_the_same_root_keeps_the_recorded_timing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Re-timed, every VQ-VAE's step count would move and every run train again: the timing is recorded once."""
    calls: list[str] = []

    def step(name: str) -> Callable[[], None]:
        return lambda: calls.append(name)

    first = timed_steps(tmp_path, {"seed": step("seed")})
    assert calls and set(calls) == {"seed"} and first["seed"] > 0
    calls.clear()
    again = timed_steps(tmp_path, {"seed": step("seed"), "ham128-patch": step("ham128-patch")})
    assert again["seed"] == first["seed"] and set(calls) == {"ham128-patch"}  # only the new run is timed
    assert "VQ-VAE timing of seed from" in capsys.readouterr().out
    calls.clear()
    assert timed_steps(tmp_path, {"ham128-patch": step("ham128-patch")}) == {"ham128-patch": again["ham128-patch"]}
    assert calls == []


@pytest.mark.parametrize("text", ['{"seed": -1}', '{"seed": "fast"}', "[1, 2]", "{not json", '{"seed": NaN}', '{"seed": true}'])
def test_a_damaged_timing_record_is_one_line(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "timing.json").write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        timed_steps(tmp_path, {"seed": lambda: None})
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "timing.json" in err and "Traceback" not in err
    assert (tmp_path / "timing.json").read_text() == text  # left as it was
