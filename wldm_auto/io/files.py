"""Atomic writes (files and folders), JSON helpers and content hashing.

Every file the pipeline produces is written to a temporary name in the same
folder, flushed to disk, then renamed over the final name, so a killed run
never leaves a half-written file under a name that looks finished.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

DISK_FULL_ERRNOS = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e is not None)
DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "disk full")


class WriteError(OSError):
    """Writing a file failed; the one-line message names the file and says so when the disk is full."""

    def __init__(self, path: str | os.PathLike, reason: str, code: int | None = None) -> None:
        super().__init__(f"{path}: {reason}")
        self.errno = code  # no filename/strerror: str() stays the one-line message


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the errors it wraps (cause, else context), each once."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def disk_full_errno(exc: BaseException) -> int | None:
    """ENOSPC/EDQUOT if ``exc`` or an error it wraps carries one, else None."""
    return next((e.errno for e in _chain(exc) if getattr(e, "errno", None) in DISK_FULL_ERRNOS), None)


def is_disk_full(exc: BaseException, folder: str | os.PathLike | None = None) -> bool:
    """True if ``exc`` (or an error it wraps) says the disk or quota is full, or ``folder``'s disk has no space."""
    if disk_full_errno(exc) is not None:
        return True
    if any(text in str(e).lower() for e in _chain(exc) for text in DISK_FULL_TEXT):
        return True
    if folder is not None:
        try:
            return shutil.disk_usage(folder).free < (1 << 20)
        except OSError:
            return False
    return False


def write_error(path: str | os.PathLike, exc: BaseException | str, cls: type[WriteError] = WriteError) -> WriteError:
    """A :class:`WriteError` (or ``cls``) for a failed write of ``path``, saying whether the disk is full."""
    if isinstance(exc, WriteError):
        return exc
    path = Path(path)
    text = exc if isinstance(exc, str) else (getattr(exc, "strerror", None) or str(exc))
    text = " ".join(str(text).split())[:200]
    code = None if isinstance(exc, str) else getattr(exc, "errno", None)
    if not isinstance(exc, str) and is_disk_full(exc, path.parent if path.parent.is_dir() else None):
        code = code if code in DISK_FULL_ERRNOS else errno.ENOSPC
        quota = code == getattr(errno, "EDQUOT", None) or "quota" in text.lower()
        what = "the disk quota is exceeded" if quota else "the disk is full"
        return cls(path, f"cannot write: {what} ({text}); free some space and run again", code)
    return cls(path, f"cannot write ({text})", code)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(final: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it over ``final`` on success.

    ``suffix`` keeps writers that infer the format from the name happy
    (e.g. ``.nii.gz`` for SimpleITK). On error the temporary file is removed
    and what was at ``final`` stays as it was; a full disk (here or while
    flushing) raises :class:`WriteError` naming ``final``.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{suffix}", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
        except OSError as exc:
            if isinstance(exc, WriteError) or not is_disk_full(exc):
                raise
            raise write_error(final, exc) from exc
        try:
            with open(tmp_path, "rb+") as handle:
                os.fsync(handle.fileno())  # a full disk may only show here (delayed allocation, NFS)
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
            os.replace(tmp_path, final)
        except OSError as exc:
            raise write_error(final, exc) from exc
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_folder(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty temporary folder beside ``final``; once the block succeeds it takes ``final``'s place.

    What was at ``final`` is replaced only then (renamed aside, then removed), so
    readers never see a half-filled folder under the final name. On error the
    temporary folder is removed and ``final`` stays as it was; a failed rename
    raises :class:`WriteError` naming ``final``.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the usual mode
        yield tmp
        old = None
        try:
            if final.exists() or final.is_symlink():
                old = final.parent / f"{tmp.name}.old"
                final.rename(old)
            tmp.rename(final)
        except OSError as exc:
            if old is not None and not final.exists():
                old.rename(final)  # put the previous version back
            raise write_error(final, exc) from exc
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _to_plain(value: Any, null_nonfinite: bool = True) -> Any:
    """JSON-ready copy of ``value``: numpy values plain, paths as text, NaN/inf as None (JSON null)."""
    if isinstance(value, dict):
        return {str(k): _to_plain(v, null_nonfinite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v, null_nonfinite) for v in value]
    if isinstance(value, np.ndarray):
        return _to_plain(value.tolist(), null_nonfinite)
    if isinstance(value, np.generic):
        value = value.item()
    if null_nonfinite and isinstance(value, float) and not math.isfinite(value):
        return None  # bare NaN/Infinity is not JSON: strict readers reject the whole file
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(data: Any, path: str | os.PathLike) -> None:
    """Write ``data`` as indented JSON, atomically (numpy values become plain; NaN/inf become null)."""
    text = json.dumps(_to_plain(data), indent=2, sort_keys=False, allow_nan=False) + "\n"
    with atomic_path(path) as tmp:
        try:
            tmp.write_text(text)
        except OSError as exc:
            raise write_error(path, exc) from exc


def read_json(path: str | os.PathLike) -> Any:
    """Read JSON, raising a ValueError that names the file on a syntax error."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from None


def save_npy(array: np.ndarray, path: str | os.PathLike) -> None:
    """Save an uncompressed .npy (memory-mappable by the loaders), atomically."""
    with atomic_path(path, suffix=".npy") as tmp:
        try:
            with open(tmp, "wb") as handle:
                np.save(handle, np.ascontiguousarray(array), allow_pickle=False)
        except OSError as exc:
            raise write_error(path, exc) from exc


def hash_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Content hash (BLAKE2b, 128 bit) of a file, or of every file in a folder (sorted)."""
    path = Path(path)
    digest = hashlib.blake2b(digest_size=16)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 (hex) of a file's bytes: the hash model archives record and check."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_data(*parts: Any) -> str:
    """Stable hash of JSON-serialisable values (settings, lists of file hashes)."""
    text = json.dumps(_to_plain(list(parts), null_nonfinite=False), sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def same_folder(a: Path, b: Path) -> bool:
    """True if ``a`` and ``b`` are the same folder (symlinks resolved; bind mounts and hard links too)."""
    if Path(a).resolve() == Path(b).resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_distinct_folders(folders: dict[str, Path],
                           consequence: str = "the {first} images would become the {second} images") -> None:
    """Refuse, in one line, two roles (MR, CT, mask, sCT, ...) given the same folder; ``consequence`` says what
    would go wrong (``{first}`` and ``{second}`` name the roles)."""
    kinds = list(folders)
    for i, first in enumerate(kinds):
        for second in kinds[i + 1:]:
            if same_folder(folders[first], folders[second]):
                same = "" if folders[first] == folders[second] else f" ({folders[second]} is the same folder)"
                raise ValueError(f"{folders[first]}: given as both the {first} and the {second} folder{same}; "
                                 f"{consequence.format(first=first, second=second)}; give each its own folder")
