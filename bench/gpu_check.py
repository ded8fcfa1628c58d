"""One-shot GPU check: run every CUDA code path of wldm_auto once, write ONE JSON file.

Each check records ``ok``, its seconds and, on CUDA, the peak of
``torch.cuda.max_memory_allocated`` (GB); a failing one records the
exception's one-line message (traceback on stderr) and the others still run.

* ``dataset``: three crops of the bundled phantom, preprocessed (``bench/train.py``);
* ``train_<Trainer>``: real training steps (loader, augmentation) of VAETrainer
  (adversarial loss on), DiffusionTrainer, WaveletDiffusionTrainer and
  RegressionTrainer with the trainers' AMP: bf16 where supported, else fp16 +
  GradScaler (``amp``, ``grad_scaler``); ``train_VAETrainer_fp16``: on a bf16
  GPU the fp16 + GradScaler path too; ``train_<Trainer>_compiled``: with
  ``torch.compile`` (CUDA; CPU only with ``--compile``);
* ``torchrun_train``: ``python -m torch.distributed.run --standalone
  --nproc_per_node 1 -m wldm_auto.cli.train``: DDP with NCCL (Gloo on CPU);
* ``predict``: wldm_predict's per-case code (load_model + predict_case) on a
  synthetic 250 x 250 x 450 MR at 2 mm (``bench/predict.py``), plan-sized
  networks with random weights, 10 DDIM steps x 5 samples: seconds per phase,
  peak GPU memory, against the goals (30 s, 16 GB); ``predict_precision``: the
  same with the plan option ``inference.precision`` bfloat16 and float16 (each where the
  device's autocast runs it; on CPU bfloat16 only): seconds, peak memory, goals, and the sCT's max |difference|
  and mean |difference| inside the body (HU) against the float32 sCT of the same seed;
* ``predict_split_case``: with 2+ GPUs, ``--split-case`` on 2 ranks (NCCL) = 1 rank;
* ``sampler``: ``bench/sampler.py`` on the device.

Checks not applying to the device are listed in ``not_run``; one that would
start after ``--budget-s`` (480 s) is skipped (not ok); the compile checks run
last; ``--only`` reruns chosen checks (with those they need).

    python bench/gpu_check.py                            # one GPU, about 8 minutes
    python bench/gpu_check.py --device cpu --quick       # tiny sizes, under a minute on two cores
    make gpu-check

Writes the JSON to ``--out`` and prints it as the last line of stdout; logs go to stderr.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from predict import model_folder, sct_difference, synthetic_mr  # noqa: E402
from sampler import parse_args as sampler_args, run_child_process  # noqa: E402
from train import DATASET, build_dataset, load_plans, time_trainer  # noqa: E402
from wldm_auto.inference.predictor import predict_case  # noqa: E402
from wldm_auto.models.precision import DTYPES, autocast_works, cuda_bf16_native  # noqa: E402

log = logging.getLogger("bench.gpu_check")

TRAINERS = ("VAETrainer", "DiffusionTrainer", "WaveletDiffusionTrainer", "RegressionTrainer")
# check-name prefix -> checks it needs first (with --only)
DEPENDS = {"train_": {"dataset"}, "torchrun_train": {"dataset"}, "train_DiffusionTrainer": {"train_VAETrainer"},
           "predict_precision": {"predict"}}
GOALS = {"predict_seconds": 30.0, "predict_peak_gpu_gb": 16.0}
FULL = {"train_steps": 3, "train_widths": "plan", "train_patch": [32, 32, 32], "train_spacing": 2.0,
        "predict_size": [250, 250, 450], "predict_widths": "plan", "predict_patch": [64, 64, 64],
        "predict_steps": 10, "predict_samples": 5, "split_size": [128, 128, 128],
        "sampler": ["--steps", "10", "--widths", "plan"]}
QUICK = {"train_steps": 2, "train_widths": "tiny", "train_patch": [16, 16, 16], "train_spacing": 4.0,
         "predict_size": [48, 48, 40], "predict_widths": "tiny", "predict_patch": [16, 16, 16],
         "predict_steps": 2, "predict_samples": 2, "split_size": [48, 48, 40], "sampler": ["--quick"]}


@dataclass
class Context:
    """What the checks share: settings, device, work folder, the dataset once built."""

    args: argparse.Namespace
    settings: dict[str, Any]
    device: torch.device
    root: Path
    deadline: float  # time.monotonic() after which no check starts
    preprocessed: Path | None = None
    results: dict[str, Any] = field(default_factory=dict)  # what one check hands to a later one

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment of a child process: this one's, the dataset's folders, the thread count."""
        env = dict(os.environ, **extra)
        if self.args.threads:
            env["OMP_NUM_THREADS"] = str(self.args.threads)
        return env

    def train_args(self) -> argparse.Namespace:
        """The options bench/train.py's load_plans and time_trainer read."""
        s = self.settings
        return argparse.Namespace(widths=s["train_widths"], patch=s["train_patch"], batch_size=None,
                                  no_adversarial=False, steps=s["train_steps"], device=self.device.type,
                                  compile=None)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:400]


def environment(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "platform": platform.platform(), "device": str(device),
                            "torch_threads": torch.get_num_threads(), "cuda_available": torch.cuda.is_available()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), gpu=props.name,
                    gpu_memory_gb=round(props.total_memory / 2**30, 2), gpus=torch.cuda.device_count(),
                    capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                    bf16_supported=torch.cuda.is_bf16_supported(), bf16_native=cuda_bf16_native(device),
                    nccl=str(torch.cuda.nccl.version()) if torch.distributed.is_nccl_available() else None)
    return info


# -- the checks ------------------------------------------------------------------------------------

def check_dataset(ctx: Context) -> dict[str, Any]:
    ctx.preprocessed = build_dataset(ctx.root / "data", ctx.settings["train_spacing"])
    return {"folder": str(ctx.preprocessed), "spacing_mm": ctx.settings["train_spacing"]}


def trainer_class(name: str, fp16: bool = False) -> type:
    """The registered trainer ``name``; with ``fp16`` a same-named subclass whose AMP is fp16 on CUDA."""
    from wldm_auto.trainers.registry import trainer_class as registered

    cls = registered(name)
    if not fp16:
        return cls

    def fp16_amp(self: Any) -> torch.dtype | None:
        return torch.float16 if self.device.type == "cuda" and self.training_plan.amp else None

    return type(name, (cls,), {"_amp_dtype": fp16_amp, "__doc__": f"{name} with fp16 autocast + GradScaler"})


def check_train(name: str, compiled: bool = False, fp16: bool = False) -> Callable[[Context], dict[str, Any]]:
    def run(ctx: Context) -> dict[str, Any]:
        if ctx.preprocessed is None:
            raise RuntimeError("no dataset (the dataset check failed)")
        args = ctx.train_args()
        args.compile = compiled
        if compiled:  # as in a training process of its own: no graphs (nor dynamic-shape guesses) of other models
            torch._dynamo.reset()
        workers = 2 if ctx.cuda else 0  # pinned-memory loader workers on CUDA
        # the VAE's final checkpoint feeds DiffusionTrainer (written once, by the plain run)
        return time_trainer(trainer_class(name, fp16), ctx.preprocessed, ctx.root / "results", args, workers,
                            save_final=name == "VAETrainer" and not (compiled or fp16))
    return run


def check_torchrun(ctx: Context) -> dict[str, Any]:
    """One training process under torchrun through wldm_train: DDP with NCCL (CUDA) or Gloo (CPU)."""
    if ctx.preprocessed is None:
        raise RuntimeError("no dataset (the dataset check failed)")
    pre = ctx.root / "torchrun_pre"
    shutil.copytree(ctx.preprocessed, pre / DATASET)
    load_plans(ctx.preprocessed, ctx.train_args()).save(pre / DATASET / "plans.json")
    results = ctx.root / "torchrun_results"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               "-m", "wldm_auto.cli.train", DATASET, "vae", "--device", ctx.device.type, "--steps", "2",
               "--steps-per-epoch", "2", "--num-workers", "0"]
    done = subprocess.run(command, env=ctx.env(wldm_preprocessed=str(pre), wldm_results=str(results)),
                          capture_output=True, encoding="utf-8", errors="replace", timeout=remaining(ctx))
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-5000:])
        lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        raise RuntimeError(f"torchrun exited {done.returncode}: {lines[-1] if lines else 'see stderr'}")
    found = re.search(r"process group: backend (\w+), rank 0 of (\d+)", done.stderr)
    backend = found.group(1) if found else None
    expected = "nccl" if ctx.cuda else "gloo"
    if backend != expected:
        raise RuntimeError(f"the training process used backend {backend!r}, expected {expected!r}")
    finals = list(results.rglob("checkpoint_final.pt"))
    if not finals:
        raise RuntimeError("torchrun finished without writing checkpoint_final.pt")
    return {"backend": backend, "world_size": int(found.group(2)), "checkpoint": str(finals[0])}


def check_predict(ctx: Context) -> dict[str, Any]:
    """wldm_predict's per-case function on a synthetic whole-body MR; figures against the goals."""
    from wldm_auto.inference.inputs import find_cases
    from wldm_auto.inference.folds import load_model

    s = ctx.settings
    root = ctx.root / "predict"
    (root / "in").mkdir(parents=True)
    mr = synthetic_mr(s["predict_size"])
    sitk.WriteImage(mr, str(root / "in" / "case_0000.nii.gz"))
    model = model_folder(root, s["predict_widths"], s["predict_patch"])
    folds = load_model(model, [0], ctx.device)
    (case,) = find_cases(root / "in")
    reset_peak(ctx)
    outcome = predict_case(folds, case, root / "out", steps=s["predict_steps"], samples=s["predict_samples"],
                           save_std=True)
    sct = sitk.ReadImage(str(outcome.outputs[0]))
    values = sitk.GetArrayViewFromImage(sct)
    ctx.results["predict"] = {"model": model, "case": case, "mr": mr, "plans": folds[0].plans,
                              "sct": values.astype(np.int32)}  # for predict_precision
    if sct.GetSize() != mr.GetSize() or not (values.min() >= -1024 and values.max() <= 3071):
        raise RuntimeError(f"sCT of size {sct.GetSize()} (MR {mr.GetSize()}), HU {values.min()}..{values.max()}")
    figures: dict[str, Any] = {
        "size_xyz": s["predict_size"], "spacing_mm": 2.0, "widths": s["predict_widths"],
        "patch_zyx": s["predict_patch"], "ddim_steps": s["predict_steps"], "samples": s["predict_samples"],
        "seconds": round(outcome.seconds, 2),
        "phases": {k: round(v, 2) for k, v in (getattr(outcome, "phases", None) or {}).items()},
    }
    if ctx.cuda:
        peak = torch.cuda.max_memory_allocated(ctx.device) / 2**30
        figures.update(peak_gpu_gb=round(peak, 3), goals=GOALS,
                       meets_goals=outcome.seconds < GOALS["predict_seconds"] and peak < GOALS["predict_peak_gpu_gb"])
    return figures


def precisions(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """(half precisions the device's autocast runs, those it does not and why)."""
    run, skipped = [], {}
    for name in ("bfloat16", "float16"):
        if name == "bfloat16" and device.type == "cuda" and not cuda_bf16_native(device):
            skipped[name] = "this GPU has no native bfloat16 (wldm_predict --precision bfloat16 runs float16 here)"
        elif name == "float16" and device.type == "cpu":
            skipped[name] = "CPU float16 autocast runs (about 19x slower than float32: no native kernels); not timed"
        elif not autocast_works(device.type, DTYPES[name]):
            skipped[name] = f"{device.type} autocast in torch {torch.__version__} does not run {name}"
        else:
            run.append(name)
    return run, skipped


def check_predict_precision(ctx: Context) -> dict[str, Any]:
    """The predict check's prediction again with ``inference.precision`` bfloat16 and float16 (networks under
    autocast, blending and DDIM steps float32), same seed: seconds, memory, goals, and the sCT difference
    from float32 in HU, largest and mean inside the body (random weights: an indication only)."""
    from wldm_auto.inference.folds import load_model
    from wldm_auto.preprocessing.case import body_mask

    if "predict" not in ctx.results:
        raise RuntimeError("no float32 prediction to compare with (the predict check failed)")
    given = ctx.results.pop("predict")
    reference = given["sct"]
    body = sitk.GetArrayFromImage(body_mask(given["mr"], given["plans"])) > 0
    s = ctx.settings
    names, skipped = precisions(ctx.device)
    figures: dict[str, Any] = {"seed": 0, "ddim_steps": s["predict_steps"], "samples": s["predict_samples"],
                               "not_run": skipped}
    for name in names:
        folds = load_model(given["model"], [0], ctx.device, precision=name)
        reset_peak(ctx)
        outcome = predict_case(folds, given["case"], ctx.root / "predict" / f"out_{name}", steps=s["predict_steps"],
                               samples=s["predict_samples"], save_std=True)  # as the float32 run
        if ctx.cuda:
            torch.cuda.synchronize(ctx.device)
        got, difference = sct_difference(outcome.outputs[0], reference, body)
        result: dict[str, Any] = {
            "autocast_dtype": str(folds[0].synthesizer.autocast).replace("torch.", ""),
            "seconds": round(outcome.seconds, 2),
            "phases": {k: round(v, 2) for k, v in outcome.phases.items()},
            **difference, "hu_range": [int(got.min()), int(got.max())]}
        if ctx.cuda:
            peak = torch.cuda.max_memory_allocated(ctx.device) / 2**30
            result.update(peak_gpu_gb=round(peak, 3), meets_goals=outcome.seconds < GOALS["predict_seconds"]
                          and peak < GOALS["predict_peak_gpu_gb"])
        figures[name] = result
    figures["note"] = "random weights; measure a trained model before making half precision the default"
    if ctx.cuda:  # cuDNN's default: float32 convolutions on Ampere and later run in TF32 (10-bit mantissa)
        figures["float32_reference_cudnn_tf32"] = bool(torch.backends.cudnn.allow_tf32)
    return figures


def check_split_case(ctx: Context) -> dict[str, Any]:
    """torchrun --split-case over 2 GPUs against 1: the same voxels (same seed)."""
    root = ctx.root / "split"
    (root / "in").mkdir(parents=True)
    sitk.WriteImage(synthetic_mr(ctx.settings["split_size"]), str(root / "in" / "case_0000.nii.gz"))
    model = model_folder(root, ctx.settings["predict_widths"], ctx.settings["predict_patch"])
    arrays, seconds = [], {}
    for nproc in (1, 2):
        out = root / f"out{nproc}"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                   "-m", "wldm_auto.cli.predict", "-i", str(root / "in"), "-o", str(out), "-m", str(model),
                   "--steps", "3", "--samples", "2", "--device", ctx.device.type, "--split-case"]
        start = time.perf_counter()
        done = subprocess.run(command, env=ctx.env(), capture_output=True, encoding="utf-8", errors="replace",
                              timeout=remaining(ctx))
        seconds[f"nproc_{nproc}"] = round(time.perf_counter() - start, 2)
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-5000:])
            raise RuntimeError(f"torchrun --nproc_per_node {nproc} --split-case exited {done.returncode}")
        arrays.append(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case.nii.gz"))).astype(np.int32))
    difference = int(np.abs(arrays[0] - arrays[1]).max())
    if difference:
        raise RuntimeError(f"2 ranks differ from 1 by up to {difference} HU (expected identical voxels)")
    return {"identical": True, "seconds": seconds, "size_xyz": ctx.settings["split_size"]}


def check_sampler(ctx: Context) -> dict[str, Any]:
    """bench/sampler.py's two approaches on the device, each in a fresh process."""
    argv = [*ctx.settings["sampler"], "--device", ctx.device.type]
    if ctx.args.threads:
        argv += ["--threads", str(ctx.args.threads)]
    sampler_args(argv)  # refuses bad options before any run
    figures: dict[str, Any] = {"argv": argv}
    for approach in ("ours", "naive"):
        run = run_child_process(approach, argv)
        figures[approach] = {"seconds": round(run["seconds"], 3), **{k: round(v, 3) for k, v in run["parts"].items()},
                             "peak_rss_gb": round(run["peak_rss_gb"], 3), **run["calls"]}
        if "peak_gpu_gb" in run:
            figures[approach]["peak_gpu_gb"] = round(run["peak_gpu_gb"], 3)
    figures["naive_over_ours_seconds"] = round(figures["naive"]["seconds"] / figures["ours"]["seconds"], 3)
    return figures


# -- running them ------------------------------------------------------------------------------------

def remaining(ctx: Context) -> float:
    return max(10.0, ctx.deadline - time.monotonic())


def reset_peak(ctx: Context) -> None:
    if ctx.cuda:
        torch.cuda.synchronize(ctx.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)


def run_check(ctx: Context, name: str, check: Callable[[Context], dict[str, Any]]) -> dict[str, Any]:
    """``check``'s figures with ok/seconds (and the peak GPU memory), or its error; never raises."""
    if time.monotonic() > ctx.deadline:
        log.warning("%s: skipped, the time budget (%d s) is spent", name, ctx.args.budget_s)
        return {"ok": False, "skipped": f"time budget of {ctx.args.budget_s} s spent"}
    log.info("check %s ...", name)
    reset_peak(ctx)
    start = time.perf_counter()
    try:
        figures = check(ctx)
        if ctx.cuda:
            torch.cuda.synchronize(ctx.device)
        result = {"ok": True, **figures}
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - one failing check must not hide the others
        log.error("%s failed:\n%s", name, traceback.format_exc())
        result = {"ok": False, "error": one_line(exc)}
    result["check_seconds"] = round(time.perf_counter() - start, 2)
    if ctx.cuda:
        result.setdefault("peak_gpu_gb", round(torch.cuda.max_memory_allocated(ctx.device) / 2**30, 3))
    log.info("%s: %s in %.1f s", name, "ok" if result["ok"] else result.get("error"), result["check_seconds"])
    return result


def plan(ctx: Context) -> tuple[list[tuple[str, Callable[[Context], dict[str, Any]]]], dict[str, str]]:
    """(checks in running order, checks that do not apply here and why)."""
    checks: list[tuple[str, Callable[[Context], dict[str, Any]]]] = [("dataset", check_dataset)]
    checks += [(f"train_{name}", check_train(name)) for name in TRAINERS]
    not_run: dict[str, str] = {}
    if ctx.cuda and cuda_bf16_native():
        checks.append(("train_VAETrainer_fp16", check_train("VAETrainer", fp16=True)))
    else:
        not_run["train_VAETrainer_fp16"] = ("the trainers already use fp16 + GradScaler on this GPU"
                                            if ctx.cuda else "no AMP on CPU")
    checks += [("torchrun_train", check_torchrun), ("predict", check_predict)]
    if precisions(ctx.device)[0]:
        checks.append(("predict_precision", check_predict_precision))
    else:
        not_run["predict_precision"] = "; ".join(precisions(ctx.device)[1].values())
    if ctx.cuda and torch.cuda.device_count() >= 2:
        checks.append(("predict_split_case", check_split_case))
    else:
        not_run["predict_split_case"] = (f"needs 2 GPUs ({torch.cuda.device_count()} here)" if ctx.cuda else
                                         "CPU: Gloo ranks are tested by tests/test_prediction_ranks.py")
    checks.append(("sampler", check_sampler))
    if ctx.cuda or ctx.args.compile:
        checks += [(f"train_{name}_compiled", check_train(name, compiled=True)) for name in TRAINERS]
    else:
        not_run.update({f"train_{name}_compiled": "CPU: torch.compile only with --compile" for name in TRAINERS})
    if ctx.args.only:
        unknown = sorted(set(ctx.args.only) - {name for name, _ in checks} - set(not_run))
        if unknown:
            raise SystemExit(f"error: --only {' '.join(unknown)}: no such check here "
                             f"(checks: {', '.join(name for name, _ in checks)})")
        wanted = set(ctx.args.only)
        for name, needs in DEPENDS.items():
            if any(w.startswith(name) for w in wanted):
                wanted |= needs
        not_run.update({name: "not asked for (--only)" for name, _ in checks if name not in wanted})
        checks = [(name, check) for name, check in checks if name in wanted]
    return checks, not_run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="default: cuda (the first visible GPU; choose one with CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes: 48x48x40 MR, tiny widths, 2 steps x 2 samples, 16^3 patches")
    parser.add_argument("--compile", action="store_true", help="on CPU: also run the torch.compile checks")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="JSON file (default: gpu_check.json)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="checks that would start later than this are skipped (default: 480 s)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--only", nargs="+", metavar="CHECK",
                        help="run only these checks (and those they need), e.g. to rerun the failed ones")
    parser.add_argument("--work", type=Path, help="work folder to keep (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA device or driver is visible"
        parser.error(f"--device cuda: CUDA is not available ({why}, torch {torch.__version__}); "
                     "use --device cpu --quick to check the script on CPU")
    if args.budget_s <= 0 or (args.threads is not None and args.threads < 1):
        parser.error("--budget-s and --threads must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    settings = QUICK if args.quick else FULL
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="wldm_gpu_check_") as tmp:
        root = args.work or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        ctx = Context(args, settings, device, root, start + args.budget_s)
        report: dict[str, Any] = {"script": "bench/gpu_check.py", "quick": args.quick,
                                  "environment": environment(device), "settings": settings, "checks": {}}
        checks, report["not_run"] = plan(ctx)
        for name, check in checks:
            report["checks"][name] = run_check(ctx, name, check)
    amp = {c.get("amp") for c in report["checks"].values() if c.get("amp")}
    report["amp"] = ", ".join(sorted(amp)) or None
    report["all_ok"] = all(c["ok"] for c in report["checks"].values())
    report["failed"] = [name for name, c in report["checks"].items() if not c["ok"]]
    report["seconds_total"] = round(time.monotonic() - start, 1)
    report["budget_seconds"] = args.budget_s
    text = json.dumps(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    log.info("%d of %d checks ok in %.0f s -> %s", len(report["checks"]) - len(report["failed"]),
             len(report["checks"]), report["seconds_total"], args.out)
    print(text)
    return 0 if report["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
