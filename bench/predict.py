"""Benchmark whole-volume prediction: seconds per phase, per DDIM step, and peak RAM.

Builds a model folder with randomly initialised networks (speed and memory do
not depend on the weights) for the default plan or tiny widths, writes a
synthetic MR (an ellipsoidal body with texture) at 2 mm, runs the real
predictor (preprocessing, tiled VAE encoding, whole-latent DDIM sampling,
tiled decoding, export), prints a table of seconds per phase (read, body
mask, preprocess = crop + resample + normalise, encode, sample, decode,
denormalise, resample back, write) on stderr and, last on stdout, one JSON
line: ``phases``, ``sampling_seconds`` (the DDIM steps), ``peak_rss_gb`` (of the prediction alone: the
peak is reset after the set-up where Linux allows, ``peak_rss_measures`` says which), ...

``--precision bfloat16|float16`` runs the networks under autocast (plan ``inference.precision``);
``--compare`` then also predicts in float32 with the same seed and reports ``max_abs_diff_hu`` and
``mean_abs_diff_body_hu`` (inside the body mask) of the sCT against it (random weights: an indication).

    python bench/predict.py --size 250 250 450 --steps 2 --widths tiny
    python bench/predict.py --phantom --steps 5
    python bench/predict.py --phantom --steps 10 --samples 5 --precision bfloat16 --compare
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from wldm_auto.inference.inputs import find_cases
from wldm_auto.inference.folds import load_model, resolve_device
from wldm_auto.inference.predictor import predict_case
from wldm_auto.models.checkpoint import save_checkpoint
from wldm_auto.models.factory import build_denoiser, build_vae
from wldm_auto.planners.schema import PRECISIONS, ConfigurationPlan, Plans, PreprocessingPlan, RegistrationPlan
from wldm_auto.preprocessing.case import body_mask

PHANTOM = Path(__file__).resolve().parents[1] / "wldm_auto/dataset_conversion/example_data/mri_dir_porcine_phantom/mr_t2.nii.gz"


def synthetic_mr(size_xyz: list[int], spacing: float = 2.0) -> sitk.Image:
    """An ellipsoid 'body' (MR-like intensities, smooth texture) in air.

    float32 from open 1-D grids: the only full-size arrays are the image and its noise, so building a
    whole-body-sized MR does not raise the process's peak RAM above what prediction needs."""
    z, y, x = (np.linspace(-1, 1, n, dtype=np.float32).reshape(shape) for n, shape in
               zip(reversed(size_xyz), ((-1, 1, 1), (1, -1, 1), (1, 1, -1))))
    body = (x / 0.9) ** 2 + (y / 0.8) ** 2 + (z / 0.97) ** 2 < 1
    rng = np.random.default_rng(0)
    volume = rng.standard_normal(body.shape, dtype=np.float32)
    volume *= 20
    volume += 400 + 150 * np.sin(7 * x) * np.cos(5 * y) * np.sin(3 * z)
    air = ~body
    volume[air] = rng.normal(5, 2, int(air.sum())).astype(np.float32)
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((spacing,) * 3)
    return image


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set size (Linux: ``/proc/self/clear_refs``); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_gb() -> float:
    """Peak resident set size since the last :func:`reset_peak_rss` (``VmHWM``), else of the whole process."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def model_folder(root: Path, widths: str, patch: list[int]) -> Path:
    config = ConfigurationPlan(data_identifier="bench", spacing=[2.0, 2.0, 2.0], median_shape=patch,
                               patch_size=patch, batch_size=2, estimated_memory_gb=0.0)
    if widths == "tiny":
        config.vae.channels, config.vae.group_width, config.vae.latent_channels = [8, 16, 32], 4, 8
        config.diffusion.unet_channels = [16, 32, 64]
    plans = Plans("bench", "wldmPlans", {"0": "MR"}, RegistrationPlan(), PreprocessingPlan(), {"3d_wldm": config})
    vae = build_vae(1, config.vae)
    unet = build_denoiser(config.diffusion, vae)
    state = {"trainer": "DiffusionTrainer", "stage": "diffusion", "step": 0, "fold": 0, "mr_channels": 1,
             "configuration": "3d_wldm", "plans": plans.to_dict(), "latent_scale": 1.0,
             "networks": {"vae": vae.state_dict(), "ema": unet.state_dict(), "unet": unet.state_dict()}}
    folder = root / "model"
    save_checkpoint(state, folder / "fold_0" / "checkpoint_final.pt")
    return folder


def sct_difference(sct_path: Path, reference: np.ndarray, body: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    """The sCT written at ``sct_path`` (HU, int32) and its difference from ``reference`` (same grid): largest
    and mean inside ``body``, in HU."""
    sct = sitk.GetArrayFromImage(sitk.ReadImage(str(sct_path))).astype(np.int32)
    difference = np.abs(sct - reference)
    return sct, {"max_abs_diff_hu": int(difference.max()),
                 "mean_abs_diff_body_hu": round(float(difference[body].mean()), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=3, default=[250, 250, 450], help="synthetic MR size (x y z) at 2 mm")
    parser.add_argument("--phantom", action="store_true", help="use the bundled phantom MR instead")
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--widths", choices=["tiny", "plan"], default="tiny", help="network widths")
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64], help="tile size in voxels (z y x)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--precision", choices=PRECISIONS, default="float32",
                        help="the networks' autocast dtype (plan inference.precision; default float32)")
    parser.add_argument("--compare", action="store_true",
                        help="with --precision bfloat16/float16: also predict in float32 (same seed), report the sCT "
                             "difference in HU")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = resolve_device(args.device, "--device")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "in").mkdir()
        mr = sitk.ReadImage(str(PHANTOM)) if args.phantom else synthetic_mr(args.size)
        sitk.WriteImage(mr, str(root / "in" / "case_0000.nii.gz"))
        model = model_folder(root, args.widths, args.patch)
        folds = load_model(model, [0], device, precision=args.precision)
        (case,) = find_cases(root / "in")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        setup_rss = peak_rss_gb()
        prediction_only = reset_peak_rss()
        start = time.time()
        outcome = predict_case(folds, case, root, steps=args.steps, samples=args.samples)
        total = time.time() - start
        predict_rss = peak_rss_gb()
        peak_gpu = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        comparison = {}
        if args.compare and args.precision != "float32":
            (root / "float32").mkdir()
            reference_outcome = predict_case(load_model(model, [0], device, precision="float32"), case,
                                             root / "float32", steps=args.steps, samples=args.samples)
            reference = sitk.GetArrayFromImage(sitk.ReadImage(str(reference_outcome.outputs[0]))).astype(np.int32)
            body = sitk.GetArrayFromImage(body_mask(mr, folds[0].plans)) > 0
            _, comparison = sct_difference(outcome.outputs[0], reference, body)
            comparison["seconds_total_float32"] = round(reference_outcome.seconds, 2)
    phases = {name: round(seconds, 2) for name, seconds in outcome.phases.items()}
    sampling = outcome.phases.get("sample", 0.0)
    print("phase            seconds", file=sys.stderr)
    for name, seconds in phases.items():
        print(f"{name:16s} {seconds:8.2f}", file=sys.stderr)
    print(f"{'total':16s} {total:8.2f}", file=sys.stderr)
    figures = {
        "input_size_xyz": list(mr.GetSize()), "spacing": list(mr.GetSpacing()), "widths": args.widths,
        "device": str(device), "precision": args.precision, "ddim_steps": args.steps, "samples": args.samples,
        "phases": phases,
        "sampling_seconds": round(sampling, 2), "seconds_per_ddim_step": round(sampling / args.steps, 3),
        "seconds_total": round(total, 2), "seconds_outside_sampling": round(total - sampling, 2),
        "peak_rss_gb": round(predict_rss, 3), "peak_rss_measures": "prediction only (VmHWM reset before it)"
        if prediction_only else "the whole process (ru_maxrss)", "setup_peak_rss_gb": round(setup_rss, 3),
        "torch_threads": torch.get_num_threads(), **comparison,
    }
    if device.type == "cuda":
        figures["peak_gpu_gb"] = round(peak_gpu, 3)  # of the --precision run
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
