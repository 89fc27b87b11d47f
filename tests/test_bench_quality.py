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


def test_variants_are_what_ham128_is_measured_against_and_combine_with_plus() -> None:
    runs = _run_configs(_args(["fsq", "plain", "straight", "conv", "fsq+conv"]))
    ham = build_config(*runs["ham128"]).vqvae
    assert (ham.quantizer.kind, ham.quantizer.lookup_dim, ham.quantizer.rotation_trick, ham.patch_size) == \
        ("ema", 8, True, 4)
    assert build_config(*runs["ham128-fsq"]).vqvae.quantizer.kind == "fsq"
    plain = build_config(*runs["ham128-plain"]).vqvae.quantizer
    assert (plain.kind, plain.lookup_dim, plain.rotation_trick, plain.codebook_size) == ("ema", 0, False, 512)
    assert build_config(*runs["ham128-straight"]).vqvae.quantizer.lookup_dim == 8
    conv = build_config(*runs["ham128-conv"])
    assert (conv.vqvae.patch_size, conv.vqvae.channels) == (1, [32, 64, 128])
    assert conv.data.image_size // conv.downsample_factor == 16  # the same 16x16 grid as ham128
    before = build_config(*runs["ham128-fsq+conv"]).vqvae  # the tokenizer ham128 had before issue 30
    assert (before.quantizer.kind, before.patch_size, before.channels, before.res_blocks) == \
        ("fsq", 1, [32, 64, 128], 1)


@pytest.mark.parametrize(("bad", "needle"), [("fsq+nope", "unknown or repeated variant"),
                                             ("fsq+fsq", "unknown or repeated variant"),
                                             ("cosine", "unknown or repeated variant"),
                                             ("fsq+plain", "is not a valid ham128 config"),
                                             ("plain+straight", None)])
def test_unknown_repeated_invalid_or_idle_variant_is_refused(bad: str, needle: str | None,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    if needle is None:  # valid, and a real change: accepted
        assert _variant(bad) == bad
        return
    with pytest.raises(argparse.ArgumentTypeError, match=needle):
        _variant(bad)
    with pytest.raises(SystemExit) as stopped:
        main(["--variants", bad])
    assert stopped.value.code == 2 and needle in capsys.readouterr().err


def test_a_variant_that_changes_nothing_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import quality

    monkeypatch.setitem(quality.VARIANTS, "again", ("vqvae.quantizer.lookup_dim=8",))  # what ham128 already has
    with pytest.raises(argparse.ArgumentTypeError, match="is what ham128 already is"):
        _variant("again")


def test_new_variants_are_timed_by_a_real_training_step() -> None:
    """The equal-time budget divides by these seconds: each variant's step runs the stage's own loss on its
    model (here at 32 px, batch 2)."""
    new = ["fsq", "plain", "conv", "fsq+conv"]
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
    rows = {r.name: r for r in _rows({"seed": values, "ham128-fsq": values}, "held out: ",
                                     ("perplexity", "codes_used", "vqvae_steps_per_s"))}
    assert rows["held out: ham128-fsq: perplexity"].baseline == "held out: seed: perplexity"
    assert rows["held out: ham128-fsq: vqvae_steps_per_s"].unit == "steps/s"


def test_tokenizer_verdicts_follow_issue_30() -> None:
    seed = {"recon_psnr": 24.0, "fd_reconstructions": 1.0, "codes_used": 0.46, "perplexity": 106.0,
            "fd_samples_floor": 1.5}
    good = {"recon_psnr": 25.6, "fd_reconstructions": 0.7, "codes_used": 0.96, "perplexity": 400.0,
            "fd_samples_floor": 1.4}
    held = {"seed": seed, "ham128": seed | {"recon_psnr": 23.0}, "ham128-gated": good, "ham128-fsq": good,
            "ham128-conv": good | {"codes_used": 0.94}, "ham128-plain": good | {"fd_samples_floor": 1.6},
            "ham128-fsq+conv": good | {"recon_psnr": 25.4}}
    lines = {line.split(" ")[1]: line for line in tokenizer_verdicts(held)}
    assert set(lines) == {"ham128", "ham128-fsq", "ham128-conv", "ham128-plain", "ham128-fsq+conv"}
    assert lines["ham128-fsq"].endswith("MET") and "+1.60 dB PSNR, recon FD x0.70, 96% of codes" in \
        lines["ham128-fsq"]
    for name in ("ham128", "ham128-conv", "ham128-plain", "ham128-fsq+conv"):
        assert lines[name].endswith("MISSED"), lines[name]


def test_set_overrides_reach_every_run_and_a_bad_one_is_one_line(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    runs = with_overrides(_run_configs(_args(["fsq"])), ["encode.train_views=1"])
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


@pytest.mark.parametrize("text", ['{"seed": -1}', '{"seed": "fast"}', "[1, 2]", "{not json", '{"seed": NaN}',
                                  '{"seed": true}'])
def test_a_damaged_timing_record_is_one_line(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "timing.json").write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        timed_steps(tmp_path, {"seed": lambda: None})
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "timing.json" in err and "Traceback" not in err
    assert (tmp_path / "timing.json").read_text() == text  # left as it was
