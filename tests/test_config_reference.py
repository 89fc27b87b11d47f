"""The configuration reference (runtime/config_reference.py): generated from the models, complete, and the
same as docs/config.md."""

from __future__ import annotations

import pytest
from helpers import REPO

from launch.pipeline import main, parser
from runtime import config_reference
from runtime.config import PRESETS


def test_docs_config_md_is_what_the_command_prints(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(parser().parse_args(["--help-config", "--markdown"])) == 0
    printed = capsys.readouterr().out
    assert printed == config_reference.markdown() + "\n"
    on_disk = (REPO / "docs" / "config.md").read_text()
    assert on_disk == printed, "docs/config.md is stale: run python launch/pipeline.py --help-config --markdown"


def test_every_config_key_has_a_description() -> None:
    assert config_reference.undescribed() == []


def test_every_key_of_every_preset_is_in_the_reference() -> None:
    documented = {e.key for s in config_reference.sections() for e in s.entries}
    stage = config_reference.STAGE
    for name, values in config_reference.preset_values().items():
        for key in values:
            generic = ".".join(stage if key.startswith("cluster.") and i == 1 and len(key.split(".")) == 3 else part
                               for i, part in enumerate(key.split(".")))
            assert key in documented or generic in documented, f"{name}: {key} missing from the reference"


def test_terminal_text_names_each_key_with_its_default_and_preset_values() -> None:
    text = config_reference.text()
    assert "  vqvae_train.lr = 0.001  (float; > 0.0)" in text
    assert "[seed: 256, improved: 256, ham128: 128]" in text  # data.image_size per preset
    assert "kind=fsq" in text and "cluster.<stage>.time_min" in text
    assert all(f"{p}:" in text for p in PRESETS if p != "smoke")
