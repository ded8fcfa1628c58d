"""The raw dataset layout (DESIGN.md section 3): dataset.json + imagesTr/targetsTr/masksTr.

    DatasetXXX_Name/dataset.json
    DatasetXXX_Name/imagesTr/CASE_0000<ending>   MR channel 0 (_0001, ... further channels)
    DatasetXXX_Name/targetsTr/CASE<ending>       CT in HU
    DatasetXXX_Name/masksTr/CASE<ending>         optional body mask
    DatasetXXX_Name/imagesTs/CASE_0000<ending>   optional test images
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wldm_auto.io.files import read_json, write_json
from wldm_auto.io.images import FILE_ENDINGS

REQUIRED_KEYS = ("name", "channel_names", "target", "file_ending", "numTraining")
CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class RawCase:
    """One case: its MR channel files (in channel order), CT target and optional mask."""

    name: str
    images: list[Path]
    target: Path | None = None
    mask: Path | None = None


@dataclass
class RawDataset:
    """A raw dataset folder and its parsed dataset.json."""

    folder: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, folder: str | Path) -> "RawDataset":
        """Parse ``folder/dataset.json``; ValueError naming the file on any problem."""
        folder = Path(folder)
        path = folder / "dataset.json"
        if not path.is_file():
            raise ValueError(f"{path}: missing (every raw dataset needs a dataset.json)")
        meta = read_json(path)
        if not isinstance(meta, dict):
            raise ValueError(f"{path}: must hold a JSON object")
        missing = [k for k in REQUIRED_KEYS if k not in meta]
        if missing:
            raise ValueError(f"{path}: missing key(s) {', '.join(missing)}")
        if meta["file_ending"] not in FILE_ENDINGS:
            raise ValueError(f"{path}: file_ending {meta['file_ending']!r} is not one of {', '.join(FILE_ENDINGS)}")
        channels = meta["channel_names"]
        if (not isinstance(channels, dict) or not channels or not all(str(k).isdigit() for k in channels)
                or sorted(int(k) for k in channels) != list(range(len(channels)))):
            raise ValueError(f"{path}: channel_names must map '0', '1', ... to names, got {channels!r}")
        return cls(folder, meta)

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def file_ending(self) -> str:
        return self.meta["file_ending"]

    @property
    def num_channels(self) -> int:
        return len(self.meta["channel_names"])

    @property
    def channel_names(self) -> list[str]:
        return [self.meta["channel_names"][str(i)] for i in range(self.num_channels)]

    def case_names(self, split: str = "Tr") -> list[str]:
        """Sorted names of cases with at least one channel file in ``images<split>``."""
        folder = self.folder / f"images{split}"
        if not folder.is_dir():
            return []
        names = set()
        for path in folder.iterdir():
            if path.name.endswith(self.file_ending):
                match = CHANNEL_RE.match(path.name[: -len(self.file_ending)])
                if match:
                    names.add(match.group("case"))
        return sorted(names)

    def case(self, name: str, split: str = "Tr") -> RawCase:
        """Paths of a case (the files need not exist: the validator checks)."""
        ending = self.file_ending
        images = [self.folder / f"images{split}" / f"{name}_{c:04d}{ending}" for c in range(self.num_channels)]
        target = self.folder / f"targets{split}" / f"{name}{ending}"
        mask = self.folder / f"masks{split}" / f"{name}{ending}"
        return RawCase(name, images, target if target.exists() else None, mask if mask.exists() else None)

    def cases(self, split: str = "Tr") -> list[RawCase]:
        return [self.case(n, split) for n in self.case_names(split)]


def write_dataset_json(
    folder: str | Path,
    name: str,
    num_training: int,
    file_ending: str = ".nii.gz",
    channel_names: dict[str, str] | None = None,
    description: str = "",
    licence: str = "see the source of the data",
    reference: str = "",
    **extra: Any,
) -> Path:
    """Write a dataset.json for the raw layout; returns its path."""
    data = {
        "name": name,
        "description": description,
        "licence": licence,
        "reference": reference,
        "channel_names": channel_names or {"0": "MR"},
        "target": "CT",
        "file_ending": file_ending,
        "numTraining": int(num_training),
        **extra,
    }
    path = Path(folder) / "dataset.json"
    write_json(data, path)
    return path
