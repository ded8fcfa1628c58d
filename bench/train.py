"""Training throughput (samples/s) of the VAE, diffusion and regression trainers, with and without workers.

What it measures: a small preprocessed dataset is built in a temporary
folder (three different crops of the bundled phantom, no registration,
``--spacing`` mm, default 4 mm - like the tests' ``preprocessed_small``
fixture). Each trainer is then built from a copy of the plan with the
chosen widths (``--widths tiny``: VAE [8,16,32] latent 8, U-Net [16,32,64],
regression U-Net [8,16,32,64]; ``plan``: the plan's own widths) at the
plan's patch size (or ``--patch``) and batch size (or ``--batch-size``),
and trained for ``--steps`` steps with the real ``train_step`` on batches
from the real loader (``BaseTrainer.batches``: random patches, pairs of
patients, augmentation), once with ``num_workers=0`` (augmentation in the
main process) and once with background workers (``--num-workers``,
default: the trainer's own default, cores - 1, at most 8). Validation and
checkpointing are left out (they are not part of a step).

The first step is not timed (it builds the workers, warms up the
allocator and, for diffusion, measures the latent scale); the rest are:
``samples_per_s = batch_size * timed_steps / seconds``, where seconds run
from the end of the first step to the end of the last one and so include
waiting for batches. ``wait_seconds`` is the part spent waiting for the
loader; ``step_seconds`` the part in ``train_step``.

The VAE is timed with its adversarial loss on (discriminator step
included, as in most of a real run: the plan switches it on after
``adv_start_step``) unless ``--no-adversarial``. The diffusion trainer
needs a VAE checkpoint: the one just trained (random-ish weights: speed
does not depend on them) is saved and used. The regression trainer is
skipped with a note when it is not registered as "RegressionTrainer" (stage
"regression") or fails to build.

What to expect: on a GPU the workers keep the accelerator busy and raise
samples/s whenever augmentation is slower than a step; on a small CPU box
(two cores) the workers compete with the training threads, so the gain is
small or negative - ``wait_seconds`` tells which side is the bottleneck.
VAE steps cost most (MR and CT through the VAE at full resolution plus the
discriminator step); diffusion steps are cheapest (no-grad VAE encoding,
then the U-Net on a latent f^3 = 64 times smaller); the regression U-Net
lies in between (measured on two CPU cores, tiny widths, 32^3 patches,
batch 2, one thread: VAE 3.5, regression 5.8, diffusion 13 samples/s).

Threads: on a machine whose cores are shared with other busy processes,
torch's OpenMP threads can wait on each other and run a small network
hundreds of times slower than one thread does (measured: a tiny U-Net
forward+backward took 5.3 s with 2 threads and 0.015 s with 1 on two
loaded cores). If the figures look absurd, compare with ``--threads 1``.

    python bench/train.py                           # plan patch, tiny widths, 6 steps
    python bench/train.py --widths plan --patch 64 64 64 --device cuda
    python bench/train.py --quick                   # 16^3 patches, 3 steps: checks the script runs

Prints ONE JSON line on stdout; logging goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import SimpleITK as sitk
import torch

if TYPE_CHECKING:
    from wldm_auto.planners.schema import Plans

log = logging.getLogger("bench.train")

PHANTOM_DIR = Path(__file__).resolve().parents[1] / "wldm_auto/dataset_conversion/example_data/mri_dir_porcine_phantom"
DATASET = "Dataset986_BenchTrain"
# (x, y, z) MR crop size and offset of its centre from the MR centre: three different "patients"
CROPS = {"caseA": ((96, 96, 40), (0, 0, 0)), "caseB": ((96, 88, 36), (20, -12, 8)),
         "caseC": ((80, 96, 40), (-24, 16, -10))}
TINY = {
    "vae": {"channels": [8, 16, 32], "group_width": 4, "latent_channels": 8, "downsampling_factor": 4,
            "discriminator_channels": 8},
    "diffusion": {"unet_channels": [16, 32, 64]},
    "wavelet_diffusion": {"unet_channels": [16, 32, 64]},
    "regression": {"unet_channels": [8, 16, 32, 64], "group_width": 4},
}
QUICK = {"patch": [16, 16, 16], "steps": 3, "widths": "tiny"}


def build_dataset(root: Path, spacing: float) -> Path:
    """Three phantom crops as a raw dataset, planned and preprocessed without registration; returns the folder."""
    from wldm_auto.preprocessing.pipeline import plan_and_preprocess

    raw, pre = root / "raw", root / "pre"
    folder = raw / DATASET
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "targetsTr").mkdir()
    mr = sitk.ReadImage(str(PHANTOM_DIR / "mr_t2.nii.gz"))
    ct = sitk.ReadImage(str(PHANTOM_DIR / "ct.nii.gz"))
    for name, (size, shift) in CROPS.items():
        index = [(n - s) // 2 + d for n, s, d in zip(mr.GetSize(), size, shift)]
        sitk.WriteImage(sitk.RegionOfInterest(mr, list(size), index), str(folder / "imagesTr" / f"{name}_0000.nii.gz"))
        sitk.WriteImage(ct, str(folder / "targetsTr" / f"{name}.nii.gz"))
    (folder / "dataset.json").write_text(json.dumps({
        "name": DATASET, "channel_names": {"0": "MR"}, "target": "CT", "file_ending": ".nii.gz",
        "numTraining": len(CROPS)}))
    os.environ.update(wldm_raw=str(raw), wldm_preprocessed=str(pre))
    summary = plan_and_preprocess(DATASET, registration=False, spacing=[spacing])
    if summary.failed:
        raise SystemExit(f"preprocessing failed: {[o.message for o in summary.failed]}")
    return pre / DATASET


def load_plans(preprocessed: Path, args: argparse.Namespace) -> Plans:
    """A fresh copy of the plan with the chosen widths, patch and batch size."""
    from wldm_auto.planners.schema import Plans

    plans = Plans.load(preprocessed / "plans.json")
    config = plans.configuration("3d_wldm")
    if args.widths == "tiny":
        for section, values in TINY.items():
            for key, value in values.items():
                setattr(getattr(config, section), key, value)
    if args.patch:
        config.patch_size = list(args.patch)
    if args.batch_size:
        config.batch_size = args.batch_size
    if args.no_adversarial:
        config.vae.adv_start_step = 10**9
    else:
        config.vae.adv_start_step = 0
    return plans


def time_trainer(cls: type, preprocessed: Path, results: Path, args: argparse.Namespace, workers: int,
                 save_final: bool = False) -> dict[str, Any]:
    """Build ``cls`` and run ``args.steps`` real steps; figures of the steps after the first."""
    from wldm_auto.paths import model_folder_name
    from wldm_auto.trainers.base import TrainerOptions

    plans = load_plans(preprocessed, args)
    output = results / model_folder_name(cls.__name__, plans.plans_name) / "fold_0"
    options = TrainerOptions(device=args.device, num_steps=args.steps, num_workers=workers,
                             compile=getattr(args, "compile", None))
    start = time.perf_counter()
    trainer = cls(plans, "3d_wldm", 0, preprocessed, output, options)
    build_seconds = time.perf_counter() - start
    loader = trainer.batches(0, args.steps)
    batches = iter(loader)
    waits, steps, losses = [], [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        out = trainer.train_step(batch)  # returns python floats: the step has finished on the device
        trainer.step += 1
        t2 = time.perf_counter()
        waits.append(t1 - t0)
        steps.append(t2 - t1)
        losses.append(out.get("loss"))
    del batches, loader
    if save_final:
        trainer.save("checkpoint_final.pt")
    timed = args.steps - 1
    seconds = sum(waits[1:]) + sum(steps[1:])
    batch_size = trainer.config.batch_size
    return {
        "num_workers": workers, "batch_size": batch_size, "patch_size": list(trainer.config.patch_size),
        "timed_steps": timed, "samples_per_s": round(batch_size * timed / seconds, 3),
        "seconds": round(seconds, 3), "wait_seconds": round(sum(waits[1:]), 3),
        "step_seconds": round(sum(steps[1:]), 3), "first_step_seconds": round(waits[0] + steps[0], 3),
        "build_seconds": round(build_seconds, 3), "last_loss": losses[-1],
        "device": str(trainer.device), **precision(trainer),
    }


def precision(trainer: Any) -> dict[str, Any]:
    """The trainer's mixed precision: autocast dtype ("off" without AMP, e.g. on CPU), GradScaler on/off, compile."""
    dtype = trainer._amp_dtype()  # noqa: SLF001 - what the trainer's autocast() uses
    scalers = [scaler.is_enabled() for _, _, scaler in trainer._optimizers.values()]  # noqa: SLF001
    use_compile = trainer.options.compile if trainer.options.compile is not None else trainer.training_plan.compile
    return {"amp": str(dtype).replace("torch.", "") if dtype is not None else "off", "grad_scaler": any(scalers),
            "compiled": bool(use_compile)}


def regression_class() -> tuple[type | None, str | None]:
    """The registered RegressionTrainer, or (None, why not)."""
    try:
        from wldm_auto.trainers.registry import TRAINERS
    except Exception as exc:  # noqa: BLE001 - the module may be mid-edit
        return None, f"trainer registry does not import ({type(exc).__name__}: {exc})"
    cls = TRAINERS.get("RegressionTrainer")
    if cls is None:
        return None, "RegressionTrainer is not registered yet"
    if getattr(cls, "stage", None) != "regression":
        return None, f"RegressionTrainer has stage {getattr(cls, 'stage', None)!r}, not 'regression'"
    return cls, None


def parse_args() -> argparse.Namespace:
    from wldm_auto.trainers.loader import default_num_workers

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="steps per trainer and loader setting, the first untimed (default: 6)")
    parser.add_argument("--patch", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                        help="patch size (z y x), multiples of 16 (default: the plan's)")
    parser.add_argument("--batch-size", type=int, default=None, help="even batch size (default: the plan's)")
    parser.add_argument("--widths", choices=["tiny", "plan"], default="tiny", help="network widths (default: tiny)")
    parser.add_argument("--spacing", type=float, default=4.0, help="spacing of the small dataset in mm (default: 4)")
    parser.add_argument("--num-workers", type=int, default=default_num_workers(),
                        help="workers of the 'with workers' runs (default: %(default)s, the trainers' default here)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads of the main process")
    parser.add_argument("--no-adversarial", action="store_true", help="time the VAE without its discriminator")
    parser.add_argument("--trainers", nargs="+", default=["vae", "diffusion", "regression"],
                        choices=["vae", "diffusion", "regression"], help="which trainers (diffusion needs vae)")
    parser.add_argument("--quick", action="store_true", help="check the script: 16^3 patches, 3 steps, tiny widths")
    args = parser.parse_args()
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is not timed)")
    if args.patch and any(p % 16 or p < 16 for p in args.patch):
        parser.error(f"--patch {args.patch}: sizes must be multiples of 16 (VAE factor x U-Net divisor)")
    if args.batch_size is not None and (args.batch_size < 2 or args.batch_size % 2):
        parser.error("--batch-size must be even and >= 2 (pairs of patients)")
    if args.num_workers < 0:
        parser.error("--num-workers must be >= 0")
    if "diffusion" in args.trainers and "vae" not in args.trainers:
        parser.error("the diffusion trainer needs the VAE run first: add 'vae' to --trainers")
    return args


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from wldm_auto.trainers.diffusion_trainer import DiffusionTrainer
    from wldm_auto.trainers.vae_trainer import VAETrainer

    worker_settings = sorted({0, args.num_workers})
    notes: list[str] = []
    if args.num_workers == 0:
        notes.append("--num-workers is 0 (given, or a one-core machine): only the no-worker setting was run")
    result: dict[str, Any] = {"widths": args.widths, "steps": args.steps, "spacing_mm": args.spacing,
                              "worker_settings": worker_settings, "torch_threads": torch.get_num_threads(),
                              "vae_adversarial": not args.no_adversarial, "trainers": {}}
    with tempfile.TemporaryDirectory(prefix="wldm_bench_train_") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        preprocessed = build_dataset(root, args.spacing)
        result["dataset_seconds"] = round(time.perf_counter() - start, 2)
        plan = load_plans(preprocessed, args).configuration("3d_wldm")
        result.update(patch_size=plan.patch_size, batch_size=plan.batch_size)
        results = root / "results"
        todo: list[tuple[str, type]] = []
        if "vae" in args.trainers:
            todo.append(("VAETrainer", VAETrainer))
        if "diffusion" in args.trainers:
            todo.append(("DiffusionTrainer", DiffusionTrainer))
        if "regression" in args.trainers:
            cls, why = regression_class()
            if cls is None:
                notes.append(f"regression skipped: {why}")
                result["trainers"]["RegressionTrainer"] = {"skipped": why}
            else:
                todo.append(("RegressionTrainer", cls))
        for name, cls in todo:
            figures: dict[str, Any] = {}
            for workers in worker_settings:
                log.info("%s: %d steps with %d worker(s)", name, args.steps, workers)
                try:
                    run = time_trainer(cls, preprocessed, results, args, workers, save_final=name == "VAETrainer")
                except Exception as exc:  # only tolerated for the trainer being written
                    if name != "RegressionTrainer":
                        raise
                    log.error("%s", traceback.format_exc())
                    figures = {"skipped": f"failed: {type(exc).__name__}: {exc}"}
                    notes.append(f"regression skipped: it failed ({type(exc).__name__}: {exc})")
                    break
                figures[f"workers_{workers}"] = run
            if len(worker_settings) == 2 and "skipped" not in figures:
                with_w, without = figures[f"workers_{worker_settings[1]}"], figures["workers_0"]
                figures["workers_speedup"] = round(with_w["samples_per_s"] / without["samples_per_s"], 3)
            result["trainers"][name] = figures
    result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    result["notes"] = notes
    print(json.dumps(result))


if __name__ == "__main__":
    main()
