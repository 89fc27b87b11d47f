import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards.ingest import IngestError, ingest


def _jpeg(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(path)
    return path


def _kinds(result) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for s in result.skipped:
        out.setdefault(s["kind"], set()).add(s["id"])
    return out


def test_ham10000_layout_with_real_csv(shared_data):
    result = ingest(shared_data / "isic-sample" / "images", shared_data / "metadata" / "HAM10000_metadata.csv")
    assert result.layout == "ham10000"
    assert sorted(r.image_id for r in result.records) == ["ISIC_0024306", "ISIC_0024320"]
    assert all(r.lesion_id and r.lesion_id.startswith("HAM_") for r in result.records)
    assert len(_kinds(result)["no_image"]) == 10015 - 2  # reported, not a crash


def test_isic2018_onehot_layout_with_real_csv(shared_data):
    csv_path = shared_data / "metadata" / "ISIC2018_Task3_Training_GroundTruth.csv"
    result = ingest(shared_data / "isic-sample" / "images", csv_path)
    assert result.layout == "isic-onehot"
    assert {r.image_id: r.label for r in result.records} == {"ISIC_0024306": 1, "ISIC_0024320": 1}  # NV
    assert len(_kinds(result)["no_image"]) == 10013


def test_isic2019_classes_bom_crlf_duplicates_and_unlabelled(tmp_path):
    images = tmp_path / "images"
    for name in ("a", "b", "c", "d", "e", "f"):
        _jpeg(images / f"{name}.jpg")
    rows = ["image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK",
            "a,0,0,0,1.0,0,0,0,0,0",  # AK -> AKIEC
            "b,0,0,0,0,0,0,0,1.0,0",  # SCC: outside the seven
            "c,0,0,0,0,0,0,0,0,1",  # UNK
            "d,1,1,0,0,0,0,0,0,0",  # not one-hot
            "a,0,0,0,1.0,0,0,0,0,0",  # duplicate, same label
            "g,1,0,0,0,0,0,0,0,0"]  # no image
    csv_path = tmp_path / "gt.csv"
    csv_path.write_bytes(("\ufeff" + "\r\n".join(rows) + "\r\n").encode())
    result = ingest(images, csv_path)
    assert [(r.image_id, r.label) for r in result.records] == [("a", 3)]
    kinds = _kinds(result)
    assert kinds["unknown_label"] == {"b", "c", "d"}
    assert kinds["duplicate_id"] == {"a"}
    assert kinds["no_image"] == {"g"}
    assert kinds["no_label"] == {"e", "f"}
    reasons = " ".join(s["reason"] for s in result.skipped)
    assert "SCC (ISIC 2019) is outside the seven" in reasons and "not one-hot" in reasons


def test_class_folders_layout(tmp_path):
    _jpeg(tmp_path / "MEL" / "m1.jpg")
    _jpeg(tmp_path / "nv" / "n1.png")
    _jpeg(tmp_path / "SCC" / "s1.jpg")
    (tmp_path / "DF").mkdir()
    _jpeg(tmp_path / "BKL" / "x.y.jpg")  # dot in id breaks webdataset keys
    (tmp_path / "NV" / "notes.txt").parent.mkdir()
    (tmp_path / "NV" / "notes.txt").write_text("hi")
    _jpeg(tmp_path / "loose.jpg")
    result = ingest(tmp_path, None)
    assert result.layout == "folders"
    assert [(r.image_id, r.label) for r in result.records] == [("m1", 0), ("n1", 1)]
    kinds = _kinds(result)
    assert kinds["unknown_label"] == {"s1"}
    assert kinds["bad_id"] == {"x.y"}
    assert kinds["no_label"] == {"loose"}
    assert kinds["not_an_image"] == {"notes"}
    assert any(s["kind"] == "empty_folder" and s["path"].endswith("DF") for s in result.skipped)


def test_unknown_layout_names_found_and_expected_columns(tmp_path):
    _jpeg(tmp_path / "images" / "a.jpg")
    (tmp_path / "m.csv").write_text("filename,diagnosis\na,mel\n")
    with pytest.raises(IngestError, match=r"found columns \['filename', 'diagnosis'\].*expected.*image_id, dx"):
        ingest(tmp_path / "images", tmp_path / "m.csv")


def test_empty_inputs_fail_clearly(tmp_path, shared_data):
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match="no class sub-folders"):
        ingest(tmp_path / "empty", None)
    csv_path = tmp_path / "ham.csv"
    shutil.copy(shared_data / "isic-sample" / "HAM10000_metadata.csv", csv_path)
    with pytest.raises(IngestError, match=r"no \.jpg/\.jpeg/\.png images"):
        ingest(tmp_path / "empty", csv_path)
