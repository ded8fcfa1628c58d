"""Whole-latent tiled DDIM sampling (ours) versus independent pixel-space patches (naive).

What it measures, for one synthetic whole-body-sized MR (an ellipsoidal
"body" with smooth texture and noise, normalised to [-1, 1], default
250 x 180 x 450 voxels (x y z) at 2 mm) and randomly initialised networks
(timings do not depend on the weights):

* ours: ``LatentSynthesizer.sample`` with the plan's tiling - the VAE
  encodes the whole MR in the fewest tiles of at most ``image_tile_scale``
  patches that overlap by ``first_stage_margin`` voxels, DDIM runs K steps on
  the WHOLE latent (noise predicted on latent tiles ``latent_tile_scale``
  patch-latents wide at ``latent_overlap``, or with ``latent_margin`` > 0 the
  fewest such tiles overlapping by that many latent voxels; Gaussian-blended,
  one shared noise field), then the VAE
  decodes in tiles like it encoded;
* naive: the MR is cut into overlapping pixel-space patches (the plan's
  patch size, same overlap); every patch is encoded, sampled with its own
  K-step DDIM loop and its own noise, decoded, and the decoded patches are
  stitched with Gaussian blending (``tiling.sliding_window``).

Each approach runs in its own fresh Python process, so its peak RAM is the
process's ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (peak resident set
size: numpy + torch CPU allocations + the interpreter and libraries). It is
reported both after set-up (imports, volume, networks: ``setup_peak_rss_gb``)
and at the end (``peak_rss_gb``); the difference is what sampling added.
``tracemalloc`` is NOT used: it does not see torch's CPU allocator. On CUDA
the peak of ``torch.cuda.max_memory_allocated`` is reported as well.

Conv throughput: a forward hook on every ``nn.Conv3d`` counts
2 * Cin * Cout * k^3 * output voxels / groups (times the batch) for every
call and records the call's input shape. ``achieved_conv_gflops`` is the
total conv FLOPs divided by the approach's wall time (so everything that is
not a convolution - GroupNorm, attention, wavelet transforms, tile copies,
blending - lowers it). The microbenchmark then runs exactly the same list of
conv3d shapes (each distinct shape timed alone, median of ``--micro-reps``
runs, times its number of calls) with ``torch.nn.functional.conv3d`` on
random tensors on the same machine; ``conv_efficiency`` = achieved / micro,
i.e. the fraction of the wall time that pure convolutions of these shapes
would need. On CPU the hooks also time each conv call inside the run
(``conv_seconds_in_run``); on CUDA that figure is left out (it would need a
synchronisation per call).

What to expect: naive patches are sampled independently, so they need a
large overlap (0.5: each voxel is encoded, denoised at every step and decoded
~8 times in 3D) to hide their seams. Ours re-blends the whole latent at every
step with one shared noise field, so its tiles barely need to overlap: each
voxel is encoded and decoded ~1.3 times, and denoised ~2.5 times per step with
the default patch-sized latent tiles at overlap 0.25 or ~1.2 times with
``--latent-overlap 0`` (the same tile size, so a U-Net call costs the same as a
naive one). The U-Net share, paid at every step, drops most, and the gap grows
with the number of steps (README: 4.9x at 50 steps with overlap 0, 2.7x with
0.25); ours also holds the whole latent and its blending buffers (about
latent_channels / f^3 of the float32 MR), a small RAM cost. Quality is not
measured here (random weights): the README's table measures each tiling on the
fidelity benchmark's trained models. Larger latent tiles
(``--latent-tile-scale 8 --latent-margin 8``: one tile per whole-body latent)
are faster still, but they change the GroupNorm statistics of the trained
U-Nets (see ``InferencePlan``'s docstring). Conv
efficiency on CPU is well below 1 with tiny widths: group-wise and 1x1x1
convs on few channels are memory-bound, and GroupNorm, attention, wavelet
transforms and tile copies take a large share of the wall time.

Threads: on a machine whose cores are shared with other busy processes,
torch's OpenMP threads can wait on each other and run a small network
hundreds of times slower than one thread does (measured: a tiny U-Net
forward+backward took 5.3 s with 2 threads and 0.015 s with 1 on two
loaded cores). If the figures look absurd, compare with ``--threads 1``.

    python bench/sampler.py                      # default size, 2 DDIM steps, tiny widths (long on CPU)
    python bench/sampler.py --steps 50 --latent-overlap 0   # the README's 4.9x row (about 20 minutes here)
    python bench/sampler.py --quick              # 48^3, 32^3 patches: checks the script runs
    python bench/sampler.py --size 160 160 160 --steps 4 --device cuda

Prints ONE JSON line on stdout; logging goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from wldm_auto.planners.schema import InferencePlan

log = logging.getLogger("bench.sampler")
PLAN = InferencePlan()  # the tiling options default to the plan's

QUICK = {"size": [48, 48, 48], "patch": [32, 32, 32], "steps": 2, "widths": "tiny", "micro_reps": 2}


def rss_gb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def synthetic_mr(size_xyz: Sequence[int], seed: int = 0) -> torch.Tensor:
    """(1, z, y, x) float32 in [-1, 1]: an ellipsoid 'body' with smooth texture and noise, air = -1.

    Built from open 1-D grids, so the only full-size arrays are the result and one noise field.
    """
    nx, ny, nz = (int(s) for s in size_xyz)
    z = np.linspace(-1, 1, nz, dtype=np.float32)[:, None, None]
    y = np.linspace(-1, 1, ny, dtype=np.float32)[None, :, None]
    x = np.linspace(-1, 1, nx, dtype=np.float32)[None, None, :]
    body = (x / 0.9) ** 2 + (y / 0.8) ** 2 + (z / 0.97) ** 2 < 1
    rng = np.random.default_rng(seed)
    volume = rng.standard_normal((nz, ny, nx), dtype=np.float32)
    volume *= 0.05
    volume += 0.25 * np.sin(7 * x) * np.cos(5 * y) * np.sin(3 * z) + 0.3
    np.clip(volume, -1.0, 1.0, out=volume)
    volume[~body] = -1.0
    return torch.from_numpy(volume)[None]


def build_networks(widths: str, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module, Any]:
    """(VAE, U-Net, schedule) with random weights: 'tiny' widths or the plan's defaults."""
    from wldm_auto.models.factory import build_denoiser, build_schedule, build_vae
    from wldm_auto.planners.schema import DiffusionPlan, VAEPlan

    vae_plan, diffusion_plan = VAEPlan(), DiffusionPlan()
    if widths == "tiny":
        vae_plan.channels, vae_plan.group_width, vae_plan.latent_channels = [8, 16, 32], 4, 8
        diffusion_plan.unet_channels = [16, 32, 64]
    diffusion_plan.dsca = True
    torch.manual_seed(0)
    vae = build_vae(1, vae_plan).to(device).eval()
    unet = build_denoiser(diffusion_plan, vae).to(device).eval()
    return vae, unet, build_schedule(diffusion_plan)


class ConvCounter:
    """Forward hooks on every nn.Conv3d of some modules: FLOPs, call shapes and (CPU) time per call."""

    def __init__(self, modules: Sequence[torch.nn.Module], time_calls: bool) -> None:
        self.records: dict[str, dict[str, Any]] = {}
        self.time_calls = time_calls
        self._start: dict[int, float] = {}
        self._handles = []
        for module in modules:
            for sub in module.modules():
                if isinstance(sub, torch.nn.Conv3d):
                    self._handles.append(sub.register_forward_pre_hook(self._pre))
                    self._handles.append(sub.register_forward_hook(self._post))

    def _pre(self, module: torch.nn.Conv3d, inputs: tuple) -> None:
        if self.time_calls:
            self._start[id(module)] = time.perf_counter()

    def _post(self, module: torch.nn.Conv3d, inputs: tuple, output: torch.Tensor) -> None:
        elapsed = time.perf_counter() - self._start.pop(id(module)) if self.time_calls else 0.0
        k = int(np.prod(module.kernel_size))
        flops = 2.0 * (module.in_channels // module.groups) * k * output.numel()
        spec = {"input": list(inputs[0].shape), "out_channels": module.out_channels,
                "kernel": list(module.kernel_size), "stride": list(module.stride), "padding": list(module.padding),
                "dilation": list(module.dilation), "groups": module.groups, "dtype": str(inputs[0].dtype)}
        key = json.dumps(spec, sort_keys=True)
        record = self.records.setdefault(key, {"spec": spec, "calls": 0, "flops": 0.0, "seconds": 0.0})
        record["calls"] += 1
        record["flops"] += flops
        record["seconds"] += elapsed

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class CallCounter:
    """Tiles (batch items) through the VAE encoder, the U-Net and the VAE decoder, and seconds in each.

    Seconds are wall time inside the calls (synchronised on CUDA), so the
    rest of the run - tile copies, padding, blending, the DDIM update - is
    ``seconds - encode - unet - decode``.
    """

    def __init__(self, vae: torch.nn.Module, unet: torch.nn.Module, device: torch.device) -> None:
        self.counts = {"encoder_tiles": 0, "unet_tiles": 0, "decoder_tiles": 0}
        self.seconds = {"encode_seconds": 0.0, "unet_seconds": 0.0, "decode_seconds": 0.0}
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        encode, decode, unet_forward = vae.encode, vae.decode, unet.forward
        vae.encode = self._wrap(encode, "encoder_tiles", "encode_seconds")
        vae.decode = self._wrap(decode, "decoder_tiles", "decode_seconds")
        unet.forward = self._wrap(unet_forward, "unet_tiles", "unet_seconds")

    def _wrap(self, fn, count_key: str, seconds_key: str):
        def wrapped(x: torch.Tensor, *rest, **kwargs):
            self.counts[count_key] += int(x.shape[0])
            self.sync()
            start = time.perf_counter()
            out = fn(x, *rest, **kwargs)
            self.sync()
            self.seconds[seconds_key] += time.perf_counter() - start
            return out

        return wrapped


@torch.no_grad()
def run_ours(vae, unet, schedule, mr: torch.Tensor, args: argparse.Namespace, device: torch.device) -> torch.Tensor:
    from wldm_auto.models.latent import LatentSynthesizer

    synthesizer = LatentSynthesizer(vae, unet, schedule, 1.0, args.patch, args.overlap, device, args.batch_size,
                                    latent_tile_scale=args.latent_tile_scale, latent_overlap=args.latent_overlap,
                                    latent_margin=args.latent_margin, image_tile_scale=args.image_tile_scale,
                                    first_stage_margin=args.first_stage_margin)
    generator = torch.Generator(device="cpu").manual_seed(0)
    return synthesizer.sample(mr, args.steps, generator=generator)[0]


@torch.no_grad()
def run_naive(vae, unet, schedule, mr: torch.Tensor, args: argparse.Namespace, device: torch.device) -> torch.Tensor:
    """Every pixel-space patch: encode -> its own K-step DDIM -> decode; patches blended with Gaussian weights."""
    from wldm_auto.diffusion.samplers import DDIMSampler, sample
    from wldm_auto.diffusion.tiling import fit_tile
    from wldm_auto.models.tiling import sliding_window

    factor = int(vae.required_divisor)
    tile = fit_tile(mr.shape[-3:], args.patch, factor)
    sampler = DDIMSampler(schedule, args.steps)
    generator = torch.Generator(device="cpu").manual_seed(0)
    latent_scale = 1.0

    def patch_fn(batch: torch.Tensor) -> torch.Tensor:
        z_mr = vae.encode(batch, "mr").mode() * latent_scale

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return unet(x, t, z_mr)

        z_ct = sample(model_fn, (z_mr.shape[0], vae.latent_channels, *z_mr.shape[-3:]), sampler,
                      generator=generator, device=z_mr.device)
        return vae.decode(z_ct / latent_scale, "ct")

    out = sliding_window(mr, tile, patch_fn, overlap=args.overlap, batch_size=args.batch_size, scale=1,
                         pad_value=-1.0, device=device, align=factor)
    return out[0, : mr.shape[-3], : mr.shape[-2], : mr.shape[-1]]


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Run one approach in this (fresh) process; returns its figures."""
    device = torch.device(args.device)
    mr = synthetic_mr(args.size)
    vae, unet, schedule = build_networks(args.widths, device)
    calls = CallCounter(vae, unet, device)
    counter = ConvCounter([vae, unet], time_calls=device.type == "cpu")
    setup_rss = rss_gb()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    log.info("%s: volume (z y x) %s, patch %s, %d DDIM steps, widths %s on %s", args.child,
             list(mr.shape[-3:]), args.patch, args.steps, args.widths, device)
    start = time.perf_counter()
    out = (run_ours if args.child == "ours" else run_naive)(vae, unet, schedule, mr, args, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    counter.remove()
    if tuple(out.shape) != tuple(mr.shape[-3:]) or not bool(torch.isfinite(out).all()):
        raise RuntimeError(f"{args.child}: output {tuple(out.shape)} (finite: {bool(torch.isfinite(out).all())}) "
                           f"for an input of {tuple(mr.shape[-3:])}")
    result = {"seconds": seconds, "setup_peak_rss_gb": setup_rss, "peak_rss_gb": rss_gb(),
              "calls": calls.counts, "parts": calls.seconds, "convs": list(counter.records.values()),
              "conv_seconds_in_run": sum(r["seconds"] for r in counter.records.values()) if device.type == "cpu" else None}
    if device.type == "cuda":
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return result


@torch.no_grad()
def microbenchmark(specs: list[dict[str, Any]], reps: int, device: torch.device) -> list[float]:
    """Median seconds of one F.conv3d call of each spec (random tensors, one warm-up)."""
    times = []
    for spec in specs:
        dtype = getattr(torch, spec["dtype"].replace("torch.", ""))
        cin = spec["input"][1]
        x = torch.randn(spec["input"], device=device, dtype=dtype)
        w = torch.randn((spec["out_channels"], cin // spec["groups"], *spec["kernel"]), device=device, dtype=dtype)
        b = torch.randn(spec["out_channels"], device=device, dtype=dtype)

        conv_args = (x, w, b, spec["stride"], spec["padding"], spec["dilation"], spec["groups"])
        F.conv3d(*conv_args)  # warm-up
        runs = []
        for _ in range(max(1, reps)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            F.conv3d(*conv_args)
            if device.type == "cuda":
                torch.cuda.synchronize()
            runs.append(time.perf_counter() - start)
        times.append(statistics.median(runs))
        del conv_args, x, w, b
    return times


def run_child_process(approach: str, argv: list[str]) -> dict[str, Any]:
    command = [sys.executable, os.path.abspath(__file__), *argv, "--child", approach]
    log.info("running %s in a fresh process", approach)
    proc = subprocess.run(command, stdout=subprocess.PIPE, encoding="utf-8", errors="replace", check=False)
    if proc.returncode != 0:
        raise SystemExit(f"the {approach} run failed (exit {proc.returncode}); see its log above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=3, default=[250, 180, 450], metavar=("X", "Y", "Z"),
                        help="synthetic MR size in voxels (x y z), 2 mm (default: 250 180 450)")
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps K (default: 2)")
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64], metavar=("Z", "Y", "X"),
                        help="pixel-space patch / tile size (z y x), multiple of 16 (default: 64 64 64)")
    parser.add_argument("--overlap", type=float, default=0.5,
                        help="overlap of pixel patches: VAE tiles of ours, every patch of the naive approach (default 0.5)")
    parser.add_argument("--latent-tile-scale", type=int, default=PLAN.latent_tile_scale,
                        help="ours: latent sampling tiles are at most this many patch-latents wide per axis "
                             f"(plan default {PLAN.latent_tile_scale})")
    parser.add_argument("--latent-overlap", type=float, default=PLAN.latent_overlap,
                        help="ours: overlap of latent sampling tiles when --latent-margin is 0 "
                             f"(plan default {PLAN.latent_overlap})")
    parser.add_argument("--latent-margin", type=int, default=PLAN.latent_margin,
                        help="ours: the fewest latent tiles whose neighbours overlap by this many latent voxels "
                             f"(plan default {PLAN.latent_margin}; 0: tiles at --latent-overlap). One shared noise "
                             "field and per-step blending keep either seam-free")
    parser.add_argument("--image-tile-scale", type=int, default=PLAN.image_tile_scale,
                        help="ours: VAE encode/decode tiles are at most this many patches wide per axis "
                             f"(plan default {PLAN.image_tile_scale})")
    parser.add_argument("--first-stage-margin", type=int, default=PLAN.first_stage_margin,
                        help="ours: neighbouring VAE tiles overlap by this many image voxels "
                             f"(plan default {PLAN.first_stage_margin})")
    parser.add_argument("--batch-size", type=int, default=4, help="tiles per network call (default: 4)")
    parser.add_argument("--widths", choices=["tiny", "plan"], default="tiny",
                        help="tiny: VAE [8,16,32] latent 8, U-Net [16,32,64]; plan: the default plan widths")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--micro-reps", type=int, default=3, help="timed runs per conv shape in the microbenchmark")
    parser.add_argument("--only", choices=["ours", "naive"], default=None, help="run one approach only")
    parser.add_argument("--quick", action="store_true",
                        help="tiny check: 48^3 volume, 32^3 patches, 2 steps, tiny widths (overrides those options)")
    parser.add_argument("--child", choices=["ours", "naive"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.steps < 1 or args.batch_size < 1 or not 0.0 <= args.overlap < 1.0:
        parser.error("need --steps >= 1, --batch-size >= 1 and 0 <= --overlap < 1")
    if any(p % 16 for p in args.patch):
        parser.error(f"--patch {args.patch}: every size must be a multiple of 16 (VAE factor 4 x U-Net divisor 4)")
    return args


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args)))
        return
    argv = [a for a in sys.argv[1:]]
    approaches = [args.only] if args.only else ["ours", "naive"]
    runs = {name: run_child_process(name, argv) for name in approaches}

    device = torch.device(args.device)
    specs: dict[str, dict[str, Any]] = {}
    for run in runs.values():
        for record in run["convs"]:
            specs[json.dumps(record["spec"], sort_keys=True)] = record["spec"]
    log.info("microbenchmark: %d distinct conv3d shapes, %d reps each", len(specs), args.micro_reps)
    seconds = dict(zip(specs, microbenchmark(list(specs.values()), args.micro_reps, device)))

    result: dict[str, Any] = {
        "size_xyz": args.size, "spacing_mm": 2.0, "patch_zyx": args.patch, "overlap": args.overlap,
        "ddim_steps": args.steps, "batch_size": args.batch_size, "widths": args.widths, "device": args.device,
        "torch_threads": args.threads or torch.get_num_threads(), "distinct_conv_shapes": len(specs),
        "memory_measure": "ru_maxrss of a fresh process per approach (numpy + torch CPU + interpreter)",
    }
    for name, run in runs.items():
        flops = sum(r["flops"] for r in run["convs"])
        micro = sum(r["calls"] * seconds[json.dumps(r["spec"], sort_keys=True)] for r in run["convs"])
        figures = {
            "seconds": round(run["seconds"], 3),
            **{k: round(v, 3) for k, v in run["parts"].items()},
            "other_seconds": round(run["seconds"] - sum(run["parts"].values()), 3),
            "peak_rss_gb": round(run["peak_rss_gb"], 3),
            "setup_peak_rss_gb": round(run["setup_peak_rss_gb"], 3),
            **run["calls"],
            "conv_calls": sum(r["calls"] for r in run["convs"]),
            "conv_gflop": round(flops / 1e9, 3),
            "achieved_conv_gflops": round(flops / 1e9 / run["seconds"], 3),
            "micro_conv_seconds": round(micro, 3),
            "micro_conv_gflops": round(flops / 1e9 / micro, 3) if micro > 0 else None,
            "conv_efficiency": round(micro / run["seconds"], 4),
        }
        if run.get("conv_seconds_in_run") is not None:
            figures["conv_seconds_in_run"] = round(run["conv_seconds_in_run"], 3)
            figures["conv_share_of_wall"] = round(run["conv_seconds_in_run"] / run["seconds"], 4)
        if "peak_gpu_gb" in run:
            figures["peak_gpu_gb"] = round(run["peak_gpu_gb"], 3)
        result[name] = figures
    if "ours" in runs and "naive" in runs:
        result["naive_over_ours_seconds"] = round(runs["naive"]["seconds"] / runs["ours"]["seconds"], 3)
        result["naive_over_ours_peak_rss"] = round(runs["naive"]["peak_rss_gb"] / runs["ours"]["peak_rss_gb"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
