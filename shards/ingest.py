"""Find labelled images in an ISIC-style input and report everything that cannot be used.

Three layouts are recognised:

* ``ham10000``: CSV with ``image_id``, ``dx`` (lower-case nv/mel/bkl/bcc/akiec/vasc/df) and
  usually ``lesion_id``;
* ``isic-onehot``: ISIC 2018 Task 3 / 2019 ground truth, ``image`` plus one-hot class columns
  (2019's ``AK`` is mapped to AKIEC; its ``SCC`` and ``UNK`` are outside the seven classes and
  those rows are skipped with that reason); an optional ``lesion_id`` column is used;
* ``folders``: no CSV, one sub-folder per class (``MEL/``, ``nv/``, ...).

Nothing is dropped silently: every unusable row, file or folder becomes a ``skipped`` entry
``{id, path, kind, reason}``. Image contents are verified later, while packing (one decode).
"""

from __future__ import annotations

import csv
import os
import stat
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from runtime.config import CLASSES
from runtime.errors import UserError
from shards.images import IMAGE_SUFFIXES, key_problem

HAM_COLUMNS = ("image_id", "dx")
ONEHOT_ALIASES = {"AK": "AKIEC"}  # ISIC 2019 renamed the class
OUTSIDE_SEVEN = ("SCC", "UNK")  # ISIC 2019 classes with no counterpart among the seven


class IngestError(UserError, ValueError):
    """The input as a whole is unusable (wrong layout, no images); the message says why."""


@dataclass(frozen=True)
class Record:
    image_id: str
    label: int
    lesion_id: str | None
    path: Path
    row: dict[str, str]


PLACEHOLDER_LESION_IDS = frozenset({"NA", "N/A", "NAN", "NONE", "NULL", "UNKNOWN", "MISSING", "-", "?"})
"""lesion_id values that say "not known" (compared case-insensitively; empty too): each such image is split as a
lesion of its own, never grouped with every other unknown one into a single giant "lesion"."""
LESION_SHARE_LIMIT = 0.02
"""A lesion holding more than this share of the images (and more than :data:`LESION_IMAGES_LIMIT`) is named in
the notes: HAM10000's largest lesion has 6 images of 10,015; one holding hundreds is a placeholder we missed."""
LESION_IMAGES_LIMIT = 20


@dataclass
class Ingested:
    layout: str
    description: str
    records: list[Record] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Facts about usable input worth a look (placeholder lesion ids, an implausibly large lesion)."""

    def skip(self, image_id: str, path: Path | str, kind: str, reason: str) -> None:
        self.skipped.append({"id": image_id, "path": str(path), "kind": kind, "reason": reason})


PSEUDO_FILE_SYSTEMS = (Path("/proc"), Path("/sys"), Path("/dev"))
"""Kernel views, not data: reading their files gives EINVAL or blocks, and their links lead anywhere."""


def check_input_folder(folder: Path, what: str) -> None:
    """Refuse (one line) an input folder that does not exist or lies on a pseudo file system."""
    folder = Path(folder)
    if not folder.is_dir():
        raise IngestError(f"{what} {folder} does not exist or is not a folder")
    real = folder.resolve()
    for pseudo in PSEUDO_FILE_SYSTEMS:
        if real == pseudo or pseudo in real.parents:
            raise IngestError(f"{what} {folder} is inside {pseudo}, a kernel pseudo file system, not a folder of "
                              "images; give the folder holding the image files")


def _odd_entry(path: Path) -> tuple[str, str]:
    """(kind, reason) for a directory entry that is neither a regular file nor a folder."""
    if path.is_symlink() and not path.exists():
        return "broken_link", f"{path.name}: symbolic link to {os.readlink(path)!r}, which does not exist"
    try:
        mode = path.stat().st_mode
    except OSError as err:
        return "unreadable", f"{path.name}: cannot be examined ({err.strerror or err})"
    kind = next((name for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                                         (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
                 if test(mode)), "not a regular file")
    return "not_a_file", f"{path.name}: {kind}, not an image file; never opened"


def walk_files(folder: Path) -> tuple[list[Path], list[tuple[Path, str, str]]]:
    """Every regular file below ``folder``, sorted, with symbolic links to folders followed (a link back to
    the folder or one above it is reported as a loop, not followed), and ``(path, kind, reason)`` for every
    other entry (broken link, FIFO, socket, device, unreadable folder): nothing below ``folder`` goes uncounted.
    Packing (:func:`ingest`) and the data identity (shards/fingerprint.py) both see exactly these files."""
    folder = Path(folder)
    files: list[Path] = []
    odd: list[tuple[Path, str, str]] = []

    def visit(directory: Path, above: frozenset[Path]) -> None:
        try:
            entries = sorted(directory.iterdir())
        except OSError as err:
            odd.append((directory, "unreadable", f"folder {directory} cannot be listed ({err.strerror or err})"))
            return
        for path in entries:
            if path.is_dir():
                real = path.resolve()
                if real in above:
                    odd.append((path, "link_loop", f"{path.name}: symbolic link to {real}, a folder above it; "
                                                   "not followed"))
                else:
                    visit(path, above | {real})
            elif path.is_file():
                files.append(path)
            else:
                odd.append((path, *_odd_entry(path)))

    root = folder.resolve()
    visit(folder, frozenset({root, *root.parents}))
    return sorted(files), odd


def _scan_images(folder: Path, result: Ingested) -> dict[str, Path]:
    """Map image id (file stem) -> file for every JPEG/PNG below ``folder``; other files and entries, and
    ids found twice are reported."""
    found: dict[str, list[Path]] = defaultdict(list)
    files, odd = walk_files(folder)
    for path, kind, reason in odd:
        result.skip(path.stem, path, kind, reason)
    for path in files:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            found[path.stem].append(path)
        else:
            result.skip(path.stem, path, "not_an_image", f"{path.name}: not a .jpg/.jpeg/.png file, ignored")
    images = {}
    for image_id, paths in found.items():
        if len(paths) > 1:
            result.skip(image_id, paths[0], "duplicate_id",
                        f"id {image_id} has {len(paths)} image files: {', '.join(map(str, paths))}")
        else:
            images[image_id] = paths[0]
    return images


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    # utf-8-sig strips a BOM; newline="" lets csv handle CRLF line ends.
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in reader.fieldnames or []]
            rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise IngestError(f"cannot read metadata CSV {path}: {err}") from None
    repeated = sorted({c for c in columns if c and columns.count(c) > 1})
    if repeated:  # csv.DictReader would silently keep the last one's values
        raise IngestError(f"{path}: column(s) {repeated} appear more than once in the header {columns} "
                          "(spaces around names are ignored); cannot tell which to use. Rename or remove the extras")
    return columns, rows


def _detect(columns: list[str], path: Path) -> str:
    ham = [c for c in HAM_COLUMNS if c in columns]
    known = set(CLASSES) | set(ONEHOT_ALIASES) | set(OUTSIDE_SEVEN)
    onehot = ["image", *(c for c in columns if c in known)] if "image" in columns else []
    is_ham, is_onehot = len(ham) == len(HAM_COLUMNS), len(onehot) >= 3
    if is_ham and is_onehot:  # which label would be the truth, dx or the one-hot columns?
        raise IngestError(f"{path}: the header matches two layouts: HAM10000 (columns {ham}) and ISIC one-hot "
                          f"(columns {onehot}); cannot tell which labels to use. Keep the columns of one layout")
    if is_ham:
        return "ham10000"
    if is_onehot:
        return "isic-onehot"
    raise IngestError(
        f"cannot tell the layout of {path}: found columns {columns}; expected either HAM10000 "
        f"({', '.join(HAM_COLUMNS)}, optional lesion_id) or ISIC 2018/2019 ground truth "
        f"(image, {', '.join(CLASSES)}[, SCC, UNK])")


def _label_ham(row: dict[str, str]) -> tuple[str | None, str]:
    """(class name or None, reason) for a HAM10000 row."""
    dx = row["dx"].upper()
    if dx in CLASSES:
        return dx, ""
    return None, f"dx {row['dx']!r} is not one of {', '.join(c.lower() for c in CLASSES)}"


def _label_onehot(row: dict[str, str], class_columns: list[str]) -> tuple[str | None, str]:
    try:
        values = {c: float(row[c] or 0) for c in class_columns}
    except ValueError:
        return None, f"non-numeric class value in {[row[c] for c in class_columns]}"
    odd = [f"{c}={row[c]}" for c, v in values.items() if not 0.0 <= v <= 1.0]  # NaN fails both comparisons
    if odd:
        return None, f"class values outside 0..1 ({', '.join(odd)}): not a one-hot row"
    hot = [c for c, v in values.items() if v >= 0.5]
    if len(hot) != 1:
        return None, f"not one-hot: {len(hot)} class columns set ({', '.join(hot) or 'none'})"
    name = ONEHOT_ALIASES.get(hot[0], hot[0])
    if name in CLASSES:
        return name, ""
    return None, f"class {name} (ISIC 2019) is outside the seven classes {', '.join(CLASSES)}"


def _from_csv(images_dir: Path, csv_path: Path) -> Ingested:
    columns, rows = _read_csv(csv_path)
    layout = _detect(columns, csv_path)
    result = Ingested(layout, f"{layout} CSV {csv_path} with images in {images_dir}")
    images = _scan_images(images_dir, result)
    if not images:
        raise IngestError(f"no .jpg/.jpeg/.png images found under {images_dir}")
    id_col = "image_id" if layout == "ham10000" else "image"
    class_columns = [c for c in columns if c in set(CLASSES) | set(ONEHOT_ALIASES) | set(OUTSIDE_SEVEN)]

    labelled: dict[str, tuple[str, dict[str, str]]] = {}
    placeholders: Counter[str] = Counter()
    conflicting: set[str] = set()
    unknown: set[str] = set()
    for line, row in enumerate(rows, start=2):
        image_id = row.get(id_col, "")
        where = f"{csv_path}:{line}"
        name, reason = _label_ham(row) if layout == "ham10000" else _label_onehot(row, class_columns)
        if name is None:
            unknown.add(image_id)
            result.skip(image_id, where, "unknown_label", reason)
        elif image_id in labelled:
            same = labelled[image_id][0] == name
            result.skip(image_id, where, "duplicate_id", f"id {image_id} listed again"
                        + (" (same label, first row kept)" if same else f" with a different label ({name})"))
            if not same:
                conflicting.add(image_id)
        else:
            labelled[image_id] = (name, row)
    for image_id in sorted(conflicting):
        result.skip(image_id, csv_path, "duplicate_id", f"id {image_id} has conflicting labels; not used")

    for image_id, (name, row) in labelled.items():
        if image_id in conflicting:
            continue
        if image_id not in images:
            result.skip(image_id, csv_path, "no_image", f"labelled in the CSV but no image file {image_id}.*")
            continue
        _add(result, Record(image_id, CLASSES.index(name), _lesion(row, placeholders), images[image_id], row))
    for image_id in sorted(set(images) - set(labelled) - unknown):
        result.skip(image_id, images[image_id], "no_label", f"image has no row in {csv_path}")
    if placeholders and "lesion_id" in columns:
        shown = ", ".join(f"{v or 'empty'!r}: {n}" for v, n in sorted(placeholders.items()))
        result.notes.append(f"{sum(placeholders.values())} image(s) have no real lesion_id ({shown}); each is split "
                            "as a lesion of its own")
    return result


def _lesion(row: dict[str, str], placeholders: Counter[str]) -> str | None:
    """The row's lesion id, or None (counted in ``placeholders``) when it is empty or a placeholder."""
    value = row.get("lesion_id", "")
    if value and value.upper() not in PLACEHOLDER_LESION_IDS:
        return value
    placeholders[value] += 1
    return None


def _large_lesions(result: Ingested) -> None:
    """Name every lesion that holds an implausible share of the images (see LESION_SHARE_LIMIT)."""
    sizes = Counter(r.lesion_id for r in result.records if r.lesion_id is not None)
    total = len(result.records)
    for lesion, n in sizes.most_common():
        if n <= LESION_IMAGES_LIMIT or n <= LESION_SHARE_LIMIT * total:
            break
        result.notes.append(f"lesion_id {lesion!r} holds {n} of {total} images ({n / total:.0%}): all of them go to "
                            "one split; if it is a placeholder for 'unknown', clear it in the CSV")


def _from_folders(images_dir: Path) -> Ingested:
    result = Ingested("folders", f"class sub-folders of {images_dir}")
    entries = sorted(images_dir.iterdir())
    subdirs = [p for p in entries if p.is_dir()]
    if not subdirs:
        raise IngestError(f"{images_dir} has no class sub-folders (expected some of "
                          f"{', '.join(CLASSES)}) and no metadata CSV was given (data.isic_csv)")
    for loose in entries:
        if loose.is_file():
            result.skip(loose.stem, loose, "no_label", "file outside any class sub-folder")
        elif not loose.is_dir():
            result.skip(loose.stem, loose, *_odd_entry(loose))
    for sub in subdirs:
        images = _scan_images(sub, result)
        name = sub.name.upper()
        if not images:
            result.skip("", sub, "empty_folder", f"class folder {sub} contains no images")
        elif name not in CLASSES:
            for image_id, path in images.items():
                result.skip(image_id, path, "unknown_label",
                            f"folder {sub.name!r} is not one of {', '.join(CLASSES)}")
        else:
            for image_id, path in sorted(images.items()):
                _add(result, Record(image_id, CLASSES.index(name), None, path, {}))
    return result


def _add(result: Ingested, record: Record) -> None:
    problem = key_problem(record.image_id)
    if problem:
        result.skip(record.image_id, record.path, "bad_id", problem)
    else:
        result.records.append(record)


def _dedupe(result: Ingested) -> Ingested:
    """Folder layouts can hold the same id in two class folders: ambiguous, so neither is used."""
    counts: dict[str, int] = defaultdict(int)
    for r in result.records:
        counts[r.image_id] += 1
    for r in result.records:
        if counts[r.image_id] > 1:
            result.skip(r.image_id, r.path, "duplicate_id", f"id {r.image_id} found in several class folders")
    result.records = sorted((r for r in result.records if counts[r.image_id] == 1), key=lambda r: r.image_id)
    return result


def ingest(images_dir: Path, csv_path: Path | None) -> Ingested:
    """Labelled records plus everything skipped, for the given images folder and optional CSV."""
    images_dir = Path(images_dir)
    check_input_folder(images_dir, "images folder")
    if csv_path is not None and not Path(csv_path).is_file():
        raise IngestError(f"metadata CSV {csv_path} does not exist")
    result = _from_csv(images_dir, Path(csv_path)) if csv_path is not None else _from_folders(images_dir)
    result = _dedupe(result)
    _large_lesions(result)
    if not result.records:
        raise IngestError(f"no usable labelled images in {result.description}; "
                          f"{summarise(result.skipped)}")
    return result


def find_images(images_dir: Path) -> tuple[dict[str, Path], list[dict[str, str]]]:
    """Image id (file stem) -> file for every image below ``images_dir``, labels unknown, and what was
    skipped (other files, ids found twice): for judging a set without a CSV (judge/evaluate.py --images)."""
    images_dir = Path(images_dir)
    check_input_folder(images_dir, "images folder")
    result = Ingested("unlabelled", f"images in {images_dir}")
    images = _scan_images(images_dir, result)
    if not images:
        raise IngestError(f"no .jpg/.jpeg/.png images found under {images_dir}")
    return images, result.skipped


def summarise(skipped: list[dict[str, str]], show: int = 5) -> str:
    """One line per kind: count and the first few ids, for the console."""
    by_kind: dict[str, list[str]] = defaultdict(list)
    for s in skipped:
        by_kind[s["kind"]].append(s["id"] or s["path"])
    if not by_kind:
        return "nothing skipped"
    return "; ".join(f"{kind}: {len(ids)} ({', '.join(ids[:show])}{', ...' if len(ids) > show else ''})"
                     for kind, ids in sorted(by_kind.items()))
