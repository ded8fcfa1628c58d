"""Per-case registration cache in ``$wldm_preprocessed/DatasetXXX/registration/CASE/``.

Holds ``ct_registered.nii.gz`` (CT in HU on the MR grid, -1024 where no CT
exists), ``valid_mask.nii.gz``, elastix transform parameter files and
``report.json``. The report is written last and carries a key (hash of the
input files and every setting that shapes the result): a folder whose report
is missing or carries another key is stale and is redone.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from wldm_auto.io.files import atomic_path, hash_data, read_json, write_json
from wldm_auto.io.images import read_image, write_image
from wldm_auto.planners.schema import Plans
from wldm_auto.preprocessing.registration import RegistrationError, register_ct_to_mr, resample_ct_to_mr

log = logging.getLogger(__name__)

CT_FILE = "ct_registered.nii.gz"
VALID_FILE = "valid_mask.nii.gz"
REPORT_FILE = "report.json"


def registration_key(input_hashes: dict[str, Any], plans: Plans) -> str:
    """Hash of the inputs and of the settings that change the registered CT."""
    settings = {k: v for k, v in dataclasses.asdict(plans.registration).items() if k != "notes"}
    return hash_data(
        input_hashes.get("images", [None])[0], input_hashes.get("target"), input_hashes.get("mask"),
        settings, list(plans.preprocessing.ct_window), dataclasses.asdict(plans.preprocessing.body_mask),
        plans.preprocessing.use_provided_masks,
    )


def load_cached(folder: Path, key: str) -> tuple[sitk.Image, sitk.Image, dict[str, Any]] | None:
    """The cached (ct, valid, report) if ``folder`` is complete and made with ``key``."""
    report_path = folder / REPORT_FILE
    if not report_path.is_file():
        return None
    try:
        report = read_json(report_path)
    except ValueError:
        return None
    if report.get("key") != key or not (folder / CT_FILE).is_file() or not (folder / VALID_FILE).is_file():
        return None
    return read_image(folder / CT_FILE, sitk.sitkFloat32), read_image(folder / VALID_FILE, sitk.sitkUInt8), report


def register_case(
    folder: Path, key: str, mr0: sitk.Image, ct: sitk.Image, body: sitk.Image, plans: Plans
) -> tuple[sitk.Image, sitk.Image, dict[str, Any], bool]:
    """(ct, valid, report, from_cache): reuse the cache or register and fill it."""
    cached = load_cached(folder, key)
    if cached is not None:
        return (*cached, True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / REPORT_FILE).unlink(missing_ok=True)  # stale: nothing in here counts until a new report lands
    window = tuple(plans.preprocessing.ct_window)
    if plans.registration.enabled:
        result = register_ct_to_mr(mr0, ct, plans.registration, window, body)
        ct_mr, valid, report = result.ct, result.valid, result.report
        for name, text in result.parameter_files.items():
            with atomic_path(folder / name) as tmp:
                tmp.write_text(text)
    else:
        start = time.time()
        ct_mr, valid = resample_ct_to_mr(mr0, ct, window, plans.registration.ct_padding_threshold_hu)
        body_np = sitk.GetArrayViewFromImage(body) > 0
        overlap = float((body_np & (sitk.GetArrayViewFromImage(valid) > 0)).sum() / max(body_np.sum(), 1))
        report = {"registration": "disabled (CT resampled in physical space)", "seconds": round(time.time() - start, 2),
                  "final_metric": None, "jacobian_min": 1.0, "jacobian_max": 1.0, "folding_fraction": 0.0,
                  "body_fraction_with_ct": overlap}
        if overlap < plans.registration.min_overlap_fraction:
            raise RegistrationError(
                f"MR and CT do not overlap: {overlap:.1%} of the body has CT behind it "
                f"(registration is off; are they in the same physical frame?)")
    write_image(sitk.Cast(sitk.Round(ct_mr), sitk.sitkInt16), folder / CT_FILE)
    write_image(valid, folder / VALID_FILE)
    _write_overlay(mr0, ct_mr, valid, folder / "overlay.png")
    report["key"] = key
    write_json(report, folder / REPORT_FILE)
    # the int16 file is what later runs read: return the same rounded values now
    return sitk.Cast(sitk.Round(ct_mr), sitk.sitkFloat32), valid, report, False


def _write_overlay(mr: sitk.Image, ct: sitk.Image, valid: sitk.Image, path: Path) -> None:
    """A quality-control picture: MR with registered CT bone and soft-tissue contours, three planes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mr_np = sitk.GetArrayViewFromImage(mr).astype(np.float32)
    ct_np = sitk.GetArrayViewFromImage(ct)
    valid_np = sitk.GetArrayViewFromImage(valid)
    spacing = mr.GetSpacing()
    centre = [s // 2 for s in mr_np.shape]
    views = [
        (lambda a: a[centre[0]], spacing[1] / spacing[0], "axial"),
        (lambda a: a[:, centre[1]], spacing[2] / spacing[0], "coronal"),
        (lambda a: a[:, :, centre[2]], spacing[2] / spacing[1], "sagittal"),
    ]
    vmax = float(np.percentile(mr_np, 99.5)) or 1.0
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.5))
    for ax, (view, aspect, title) in zip(axes, views):
        ax.imshow(view(mr_np), cmap="gray", vmin=0, vmax=vmax, aspect=aspect, origin="lower")
        ax.contour(view(ct_np), [-300], colors="c", linewidths=0.6)
        ax.contour(view(ct_np), [250], colors="m", linewidths=0.8)
        ax.contour(view(valid_np), [0.5], colors="y", linewidths=0.6, linestyles="dashed")
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle("MR with registered CT: cyan -300 HU, magenta 250 HU (bone), yellow dashed: CT field of view")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
