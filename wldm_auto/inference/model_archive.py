"""Shareable model files: one zip with everything prediction needs, and a manifest that vouches for it.

Layout of a model archive (``wldm_export_model``)::

    manifest.json                                   format, versions, hashes, licence, description
    Dataset001_X/<Trainer>__<plans>__<config>/      plans.json, dataset.json, dataset_fingerprint.json
    Dataset001_X/<Trainer>__<plans>__<config>/fold_F/checkpoint_final.pt    one per exported fold

Installing (``wldm_install_model``) checks the archive before writing anything:
the format version, that every entry is a plain relative path listed in the
manifest (no absolute paths, ``..``, links: no "zip slip"), and every file's
size and SHA-256. It then unpacks into a temporary folder beside the target
(hashing again as it writes), loads each checkpoint with ``weights_only=True``
(tensors and plain data only: nothing is unpickled), and only then renames the
folder into place under ``$wldm_results``. ``wldm_predict -m model.zip`` does
the same into a temporary folder that is removed once the model is loaded.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import platform
import re
import stat
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO, Any

import torch

from wldm_auto import __version__
from wldm_auto.io.files import atomic_folder, atomic_path, read_json
from wldm_auto.models.loading import load_synthesis_checkpoint
from wldm_auto.paths import model_folder_name, parse_dataset_id, parse_model_folder_name, results_root

log = logging.getLogger(__name__)

FORMAT = "wldm_auto model archive"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILES = ("plans.json", "dataset.json", "dataset_fingerprint.json")
OPTIONAL_FILES = ("std_scale.json",)  # packed when present (wldm_calibrate_std), silently absent otherwise
CHECKPOINT = "checkpoint_final.pt"
MAX_MANIFEST_BYTES = 4 << 20
_SAFE_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # zip entry times: the same model gives the same bytes
_CHUNK = 1 << 20


class ArchiveError(ValueError):
    """A model archive cannot be used; the one-line message names the archive and the reason."""


@dataclass
class Manifest:
    """``manifest.json``: what the archive holds and how to check it."""

    format: str
    format_version: int
    dataset: str
    trainer: str
    plans: str
    configuration: str
    folds: list[int]
    checkpoint: str
    files: dict[str, dict[str, Any]]  # path inside the model folder -> {"sha256": hex, "bytes": size}
    licence: str = "unspecified"
    description: str = ""
    created_with: dict[str, str] = field(default_factory=dict)  # wldm_auto, torch, python versions
    created: str = ""  # UTC, ISO 8601

    @property
    def model_folder(self) -> str:
        """``<Trainer>__<plans>__<config>``."""
        return model_folder_name(self.trainer, self.plans, self.configuration)

    @property
    def root(self) -> str:
        """The model folder's path inside the archive (and under ``$wldm_results``)."""
        return f"{self.dataset}/{self.model_folder}"


def _versions() -> dict[str, str]:
    return {"wldm_auto": __version__, "torch": torch.__version__, "python": platform.python_version()}


def _model_files(model_folder: Path, folds: Sequence[int] | None, checkpoint: str) -> tuple[list[int], list[str]]:
    """(folds, files to pack relative to ``model_folder``); ValueError naming what is missing."""
    if folds:
        chosen = list(folds)
    else:
        chosen = sorted(int(p.parent.name[5:]) for p in model_folder.glob(f"fold_*/{checkpoint}")
                        if p.parent.name[5:].isdigit())
        if not chosen:
            raise ValueError(f"{model_folder}: no fold_*/{checkpoint} to export (is training finished?)")
    files = []
    for name in MODEL_FILES:
        if (model_folder / name).is_file():
            files.append(name)
        else:
            log.warning("%s: no %s; exported without it", model_folder, name)
    files += [name for name in OPTIONAL_FILES if (model_folder / name).is_file()]
    for fold in chosen:
        path = model_folder / f"fold_{fold}" / checkpoint
        if not path.is_file():
            raise ValueError(f"{path}: not found (is training of fold {fold} finished? it writes {checkpoint} at the end)")
        load_synthesis_checkpoint(path)  # a broken or stage-1 checkpoint is never shipped
        files.append(f"fold_{fold}/{checkpoint}")
    return chosen, files


def _licence_of(model_folder: Path) -> str:
    """The licence the model folder's dataset.json names, or "unspecified" (with a warning)."""
    path = model_folder / "dataset.json"
    meta = read_json(path) if path.is_file() else {}
    licence = str(meta.get("licence") or meta.get("license") or "").strip() if isinstance(meta, dict) else ""
    if not licence:
        log.warning("%s: no licence given (--licence) and none in dataset.json: the archive says 'unspecified'",
                    model_folder)
    return licence or "unspecified"


def export_model(model_folder: str | os.PathLike, output: str | os.PathLike, folds: Sequence[int] | None = None,
                 checkpoint: str = CHECKPOINT, licence: str | None = None, description: str = "",
                 overwrite: bool = False) -> Manifest:
    """Write ``output`` (a ``.zip``): the model folder's plans, dataset.json, fingerprint and the
    ``checkpoint`` of each of ``folds`` (None: every fold that has it), with a manifest.

    ``licence`` None: the licence in the model's dataset.json. Each checkpoint is
    loaded (``weights_only``) first, so a broken one is never shipped. The zip is
    written atomically; an existing ``output`` is replaced only with ``overwrite``.
    """
    model_folder, output = Path(model_folder), Path(output)
    if not model_folder.is_dir():
        raise ValueError(f"{model_folder}: model folder not found")
    trainer, plans, configuration = parse_model_folder_name(model_folder.name)
    dataset = model_folder.resolve().parent.name
    if parse_dataset_id(dataset) is None or not dataset.startswith("Dataset"):
        raise ValueError(f"{model_folder}: not inside a DatasetXXX_Name folder (as wldm_train writes it)")
    if output.suffix.lower() != ".zip":
        raise ValueError(f"{output}: the archive name must end in .zip")
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output}: exists; use --overwrite to replace it")
    chosen, files = _model_files(model_folder, folds, checkpoint)
    manifest = Manifest(FORMAT, FORMAT_VERSION, dataset, trainer, plans, configuration, chosen, checkpoint, {},
                        licence.strip() if licence and licence.strip() else _licence_of(model_folder),
                        description, _versions(),
                        datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat())
    with atomic_path(output, suffix=".zip") as tmp, zipfile.ZipFile(tmp, "w") as archive:
        for name in files:
            manifest.files[name] = _add(archive, model_folder / name, f"{manifest.root}/{name}")
        info = _entry(MANIFEST, zipfile.ZIP_DEFLATED)
        archive.writestr(info, json.dumps(asdict(manifest), indent=2) + "\n")
    log.info("%s: %s, fold(s) %s, %d files", output, manifest.root, ", ".join(map(str, chosen)), len(files))
    return manifest


def _entry(name: str, compression: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
    info.compress_type = compression
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    return info


def _add(archive: zipfile.ZipFile, source: Path, name: str) -> dict[str, Any]:
    """Copy ``source`` into ``archive`` as ``name``, hashing what is copied; its manifest entry."""
    size = source.stat().st_size
    compression = zipfile.ZIP_STORED if name.endswith(".pt") else zipfile.ZIP_DEFLATED  # .pt: a zip already
    digest = hashlib.sha256()
    with open(source, "rb") as src, archive.open(_entry(name, compression), "w",
                                                 force_zip64=size >= zipfile.ZIP64_LIMIT) as dst:
        while block := src.read(_CHUNK):
            digest.update(block)
            dst.write(block)
    return {"sha256": digest.hexdigest(), "bytes": size}


def open_archive(path: str | os.PathLike) -> tuple[zipfile.ZipFile, Manifest]:
    """The open zip and its checked manifest; ArchiveError for anything that is not a usable archive."""
    path = Path(path)
    if not path.is_file():
        raise ArchiveError(f"{path}: model archive not found")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArchiveError(f"{path}: not a zip file ({exc})") from None
    try:
        return archive, _manifest(archive, path)
    except BaseException:
        archive.close()
        raise


def _manifest(archive: zipfile.ZipFile, path: Path) -> Manifest:
    try:
        info = archive.getinfo(MANIFEST)
    except KeyError:
        raise ArchiveError(f"{path}: not a wldm_auto model archive (no {MANIFEST})") from None
    if info.file_size > MAX_MANIFEST_BYTES:
        raise ArchiveError(f"{path}: {MANIFEST} is implausibly large ({info.file_size} bytes)")
    try:
        data = json.loads(archive.read(info))
    except (ValueError, zipfile.BadZipFile) as exc:
        raise ArchiveError(f"{path}: {MANIFEST} is not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ArchiveError(f"{path}: not a wldm_auto model archive ({MANIFEST} lacks format {FORMAT!r})")
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ArchiveError(f"{path}: {MANIFEST} format_version {version!r} is not an integer")
    if version > FORMAT_VERSION:
        writer = (data.get("created_with") or {}).get("wldm_auto", "a newer version")
        raise ArchiveError(f"{path}: model archive format version {version} (written by wldm_auto {writer}) is newer "
                           f"than this wldm_auto {__version__} reads (format version {FORMAT_VERSION}); "
                           "update wldm_auto to use it")
    known = {f.name for f in fields(Manifest)}
    try:
        manifest = Manifest(**{k: v for k, v in data.items() if k in known})
    except TypeError as exc:
        raise ArchiveError(f"{path}: {MANIFEST} is incomplete ({exc})") from None
    _check_manifest(manifest, path)
    return manifest


def _check_manifest(manifest: Manifest, path: Path) -> None:
    """ArchiveError unless names, folds and file entries are well-formed and safe."""
    texts = ("dataset", "trainer", "plans", "configuration", "checkpoint", "licence", "description")
    wrong = [k for k in texts if not isinstance(getattr(manifest, k), str)]
    if wrong or not isinstance(manifest.folds, list) or not all(
            isinstance(f, int) and not isinstance(f, bool) and f >= 0 for f in manifest.folds):
        raise ArchiveError(f"{path}: {MANIFEST}: {', '.join(wrong) or 'folds'} of the wrong type")
    if not _SAFE_PART.match(manifest.checkpoint):
        raise ArchiveError(f"{path}: {MANIFEST}: checkpoint {manifest.checkpoint!r} is not a plain file name")
    try:
        manifest.model_folder  # noqa: B018 - validates trainer, plans and configuration
    except ValueError as exc:
        raise ArchiveError(f"{path}: {MANIFEST}: {exc}") from None
    if parse_dataset_id(manifest.dataset) is None or not manifest.dataset.startswith("Dataset"):
        raise ArchiveError(f"{path}: {MANIFEST}: dataset {manifest.dataset!r} is not a DatasetXXX_Name")
    if not manifest.files or not isinstance(manifest.files, dict):
        raise ArchiveError(f"{path}: {MANIFEST} lists no files")
    for name, entry in manifest.files.items():
        _check_relative(name, path)
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64
                and isinstance(entry.get("bytes"), int) and entry["bytes"] >= 0):
            raise ArchiveError(f"{path}: {MANIFEST}: entry {name!r} needs a sha256 (64 hex digits) and bytes")
    missing = [f for f in manifest.folds if f"fold_{f}/{manifest.checkpoint}" not in manifest.files]
    if missing or not manifest.folds:
        raise ArchiveError(f"{path}: {MANIFEST}: no {manifest.checkpoint} for fold(s) {missing or 'any'}")


def _check_relative(name: str, path: Path) -> None:
    """ArchiveError unless ``name`` is a plain relative path (no absolute path, '..', backslash or drive)."""
    parts = name.split("/")
    if not name or "\\" in name or not all(_SAFE_PART.match(p) and p not in (".", "..") for p in parts):
        raise ArchiveError(f"{path}: entry {name!r} is not a plain relative path (absolute, '..', backslash or "
                           "odd characters); refusing the archive")


def verify_archive(archive: zipfile.ZipFile, manifest: Manifest, path: Path) -> None:
    """Read every file of the archive and check its size and SHA-256 against the manifest; nothing is written.

    ArchiveError for an entry that is unsafe (links, paths outside the model
    folder), unlisted, missing, duplicated or changed."""
    expected = {f"{manifest.root}/{name}": name for name in manifest.files}
    names = archive.namelist()
    if len(names) != len(set(names)):
        raise ArchiveError(f"{path}: holds the same entry twice; refusing the archive")
    for info in archive.infolist():
        if info.filename == MANIFEST:
            continue
        _check_relative(info.filename, path)
        if info.filename not in expected:
            raise ArchiveError(f"{path}: entry {info.filename!r} is not listed in {MANIFEST}; refusing the archive")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise ArchiveError(f"{path}: entry {info.filename!r} is a symbolic link; refusing the archive")
    absent = sorted(set(expected) - set(names))
    if absent:
        raise ArchiveError(f"{path}: {absent[0]} is listed in {MANIFEST} but missing from the archive")
    for entry, name in expected.items():
        with archive.open(entry) as src:
            _copy_checked(src, None, manifest.files[name], entry, path)


def _copy_checked(src: IO[bytes], dst: IO[bytes] | None, expected: dict[str, Any], entry: str, path: Path) -> None:
    """Hash (and copy to ``dst``) at most the expected bytes; ArchiveError on a size or hash mismatch."""
    digest, size, limit = hashlib.sha256(), 0, int(expected["bytes"])
    while block := src.read(_CHUNK):
        size += len(block)
        if size > limit:
            break
        digest.update(block)
        if dst is not None:
            dst.write(block)
    if size != limit or digest.hexdigest() != expected["sha256"]:
        raise ArchiveError(f"{path}: {entry} does not match its SHA-256 in {MANIFEST} (changed or damaged after "
                           "export); refusing the archive")


def _unpack(archive: zipfile.ZipFile, manifest: Manifest, path: Path, target: Path) -> None:
    """Write the model folder's files into ``target`` (existing), checking every hash as it goes, then load each
    checkpoint with ``weights_only=True`` (ArchiveError naming the archive for one prediction cannot use)."""
    for name, expected in manifest.files.items():
        destination = target.joinpath(*name.split("/"))
        destination.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(f"{manifest.root}/{name}") as src, open(destination, "xb") as dst:
            _copy_checked(src, dst, expected, f"{manifest.root}/{name}", path)
    for fold in manifest.folds:
        try:
            load_synthesis_checkpoint(target / f"fold_{fold}" / manifest.checkpoint)
        except ValueError as exc:
            raise ArchiveError(f"{path}: fold_{fold}/{manifest.checkpoint}: {str(exc).split(': ', 1)[-1]}") from None


def install_model(path: str | os.PathLike, results: str | os.PathLike | None = None,
                  overwrite: bool = False) -> Path:
    """Install a model archive as ``<results>/<dataset>/<Trainer>__<plans>__<config>`` (``results`` None:
    ``$wldm_results``); returns that folder.

    The whole archive is verified before anything is written; an installed
    model is replaced only with ``overwrite`` (FileExistsError otherwise), and
    only once the new one is complete.
    """
    path = Path(path)
    archive, manifest = open_archive(path)
    with archive:
        verify_archive(archive, manifest, path)
        root = Path(results) if results is not None else results_root(create=True)
        destination = root / manifest.dataset / manifest.model_folder
        if destination.exists() and not overwrite:
            raise FileExistsError(f"{destination}: a model is installed there; use --overwrite to replace it")
        _warn_same_id(root, manifest.dataset)
        with atomic_folder(destination) as tmp:
            _unpack(archive, manifest, path, tmp)
    log.info("%s: installed %s (fold(s) %s; licence: %s)", path, destination,
             ", ".join(map(str, manifest.folds)), manifest.licence)
    return destination


def _warn_same_id(root: Path, dataset: str) -> None:
    """Warn when another dataset with the same id is installed (``-d ID`` would then be ambiguous)."""
    dataset_id = parse_dataset_id(dataset)
    others = sorted(p.name for p in root.glob("Dataset*") if p.name != dataset and parse_dataset_id(p.name) == dataset_id)
    if others:
        log.warning("%s: %s also uses id %03d: predict with -d %s (full name) or -m", root, ", ".join(others),
                    dataset_id, dataset)


def is_model_archive(path: str | os.PathLike) -> bool:
    """True if ``path`` is a file (a zip to be checked as a model archive) rather than a model folder."""
    return Path(path).is_file() and zipfile.is_zipfile(path)


@contextmanager
def extracted_model(path: str | os.PathLike) -> Iterator[Path]:
    """Unpack a model archive (hashes checked) into a temporary folder; yields its model folder, removed on exit."""
    path = Path(path)
    archive, manifest = open_archive(path)
    with archive, tempfile.TemporaryDirectory(prefix="wldm_model_") as tmp:
        folder = Path(tmp) / manifest.dataset / manifest.model_folder
        folder.mkdir(parents=True)
        verify_archive(archive, manifest, path)
        _unpack(archive, manifest, path, folder)
        log.info("%s: model %s (licence: %s) unpacked to a temporary folder", path, manifest.root, manifest.licence)
        yield folder
