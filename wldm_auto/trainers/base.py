"""Training machinery shared by every trainer: loop, schedule, AMP, DDP, checkpoints, logs.

A concrete trainer (a small subclass) builds its networks and optimisers,
does one optimisation step on a batch and validates; this class does the
rest. Batches are a pure function of (seed, step, rank) (see
``trainers/data.py``), the RNG states travel in the checkpoint, so a run
resumed with ``--c`` continues exactly where the saved one stopped.
"""
from __future__ import annotations

import logging
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ContextManager

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from wldm_auto.io.files import read_json, write_json
from wldm_auto.models.checkpoint import Checkpoint, disk_full_guard, load_checkpoint, save_checkpoint
from wldm_auto.models.distributed import init_process_group
from wldm_auto.models.precision import cuda_bf16_native
from wldm_auto.planners.schema import ConfigurationPlan, Plans, TrainingPlan
from wldm_auto.trainers.data import PreprocessedDataset, StepBatches, validation_box
from wldm_auto.trainers.loader import default_num_workers, make_loader
from wldm_auto.trainers.progress import draw_progress
from wldm_auto.trainers.rng import rng_state, set_rng_state

log = logging.getLogger(__name__)

# what --c continues from, most recent first: the end-of-epoch writes go latest -> history/progress -> best,
# and final comes last, so whichever of these exists first in this order is the newest complete state
RESUMABLE = ("checkpoint_latest.pt", "checkpoint_final.pt", "checkpoint_best.pt")
# progress.png is redrawn after an epoch at most this often, and always after a run's last epoch (history.json
# every epoch): a draw takes ~1 s of matplotlib, which was most of the time of short CPU runs' many short epochs
PROGRESS_EVERY_SECONDS = 30.0


@dataclass
class TrainerOptions:
    """Run-time choices that are not part of the plan (command-line flags)."""

    device: str = "auto"  # "cpu", "cuda" or "auto"
    seed: int = 12345
    num_steps: int | None = None  # overrides num_epochs * steps_per_epoch
    num_epochs: int | None = None
    steps_per_epoch: int | None = None
    num_workers: int | None = None
    compile: bool | None = None
    deterministic: bool = False
    stop_at_step: int | None = None  # stop (after checkpointing) at this step, as if killed: for tests
    vae_trainer: str | None = None  # stage 2: which stage-1 trainer's VAE to use (default VAETrainer)
    prior_trainer: str | None = None  # residual_diffusion: which regression trainer's U-Net is the prior

    def check(self) -> None:
        """ValueError (one line) for counts that are not positive integers or worker counts below 0."""
        positive = {"num_steps": "--steps", "num_epochs": "--epochs", "steps_per_epoch": "--steps-per-epoch",
                    "stop_at_step": "stop_at_step"}
        for name, flag in positive.items():
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{flag} must be a positive integer, got {value!r}")
        workers = self.num_workers
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
            raise ValueError(f"--num-workers must be an integer >= 0, got {workers!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"--seed must be an integer from 0 to {2**63 - 1}, got {self.seed!r}")


class BaseTrainer:
    """Subclasses set ``stage`` and implement build, train_step, validate."""

    stage: str = ""
    best_metric: str = "val_loss"  # key in the validation dict
    best_mode: str = "min"  # "min" or "max"

    def __init__(self, plans: Plans, configuration: str, fold: int, preprocessed: Path, output: Path,
                 options: TrainerOptions | None = None) -> None:
        self.plans = plans
        self.configuration_name = configuration
        self.config: ConfigurationPlan = plans.configuration(configuration)
        self.fold = fold
        self.preprocessed = Path(preprocessed)
        self.output = Path(output)
        self.options = options or TrainerOptions()
        self.options.check()
        self.apply_plan_overrides()
        self.rank, self.world_size, self.local_rank = _init_distributed(self.options.device)
        self.device = _pick_device(self.options.device, self.local_rank)
        self.is_main = self.rank == 0
        self._seed_everything(self.options.seed + self.rank)
        if self.options.deterministic:
            # cuBLAS needs a fixed workspace to be deterministic (read when its handle is made: before any CUDA work)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
            log.info("--deterministic: operations without a deterministic CUDA kernel (e.g. the backward of "
                     "trilinear interpolation) warn and run anyway, so GPU runs may still differ slightly")
        schedule = self.training_plan
        # "is None", not "or": an explicit 0 must never fall back to the plan (options.check refuses it)
        self.steps_per_epoch = schedule.steps_per_epoch if self.options.steps_per_epoch is None \
            else self.options.steps_per_epoch
        epochs = schedule.num_epochs if self.options.num_epochs is None else self.options.num_epochs
        self.total_steps = epochs * self.steps_per_epoch if self.options.num_steps is None else self.options.num_steps
        if self.steps_per_epoch < 1 or self.total_steps < 1:
            raise ValueError(f"{self.stage} training plan: steps_per_epoch ({self.steps_per_epoch}) and "
                             f"num_epochs x steps_per_epoch ({self.total_steps}) must be positive")
        self.steps_per_epoch = min(self.steps_per_epoch, self.total_steps)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self._cropped_logged: set[str] = set()  # validation cases already reported as cropped
        self.epoch_sums: dict[str, float] = {}
        self.epoch_count = 0
        self.epoch_started = time.time()
        self.progress_drawn = time.time()  # progress.png: last drawn (see PROGRESS_EVERY_SECONDS)
        self.stop_step = self.total_steps  # where this run stops (run(): --stop-at-step)
        self.best_value: float | None = None
        self.best_step: int | None = None  # step of the best value (checkpoint_best.pt), if any
        self.train_cases, self.val_cases = self._split()
        data_folder = self.preprocessed / self.config.data_identifier
        self.train_data = PreprocessedDataset(data_folder, self.train_cases)
        self.val_data = PreprocessedDataset(data_folder, self.val_cases)
        self.build()

    # -- what subclasses provide -------------------------------------------------
    @property
    def training_plan(self) -> TrainingPlan:
        raise NotImplementedError

    def apply_plan_overrides(self) -> None:
        """Ablation variants change their (in-memory) plan here; the checkpoint records the result."""

    def build(self) -> None:
        raise NotImplementedError

    def networks(self) -> dict[str, torch.nn.Module]:
        """Unwrapped networks to checkpoint, by name."""
        raise NotImplementedError

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        raise NotImplementedError

    def validate(self) -> dict[str, float]:
        raise NotImplementedError

    # -- shared helpers for subclasses -----------------------------------------------
    def make_optimizer(self, params: Any, learning_rate: float) -> torch.optim.Optimizer:
        """AdamW with the plan's weight decay; its learning rate follows :meth:`lr_factor` of the global step."""
        optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=self.training_plan.weight_decay)
        self._optimizers = getattr(self, "_optimizers", {})
        scaler = torch.amp.GradScaler("cuda", enabled=self._amp_dtype() == torch.float16)
        self._optimizers[f"opt{len(self._optimizers)}"] = (optimizer, learning_rate, scaler)
        return optimizer

    def lr_factor(self, step: int) -> float:
        """Linear warm-up, then cosine decay to 0 at the last step.

        The warm-up lasts ``warmup_steps`` but never more than a tenth of the run,
        so a short ``--steps`` run still trains at a useful learning rate.
        """
        total = max(1, self.total_steps)
        warmup = min(self.training_plan.warmup_steps, total // 10)
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def optimise(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: Any, *more_params: Any) -> None:
        """Backward (scaled under fp16 AMP), clip gradients, step, zero. ``more_params``: further parameter
        groups of the same optimizer whose gradient norm is clipped on its own (so that they cannot change how
        much ``params`` are clipped)."""
        _, _, scaler = next(v for v in self._optimizers.values() if v[0] is optimizer)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        if self.training_plan.grad_clip > 0:
            for group in (params, *more_params):
                torch.nn.utils.clip_grad_norm_(group, self.training_plan.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    @cached_property
    def bone_level(self) -> float:
        """The bone threshold (250 HU, as bone Dice) in the normalised CT units the losses see (computed once:
        the plan's CT window does not change during training)."""
        from wldm_auto.io.hu import BONE_THRESHOLD_HU
        from wldm_auto.io.normalization import normalise_ct

        return float(normalise_ct(np.array([BONE_THRESHOLD_HU]), self.plans.preprocessing.ct_window)[0])

    def autocast(self) -> ContextManager:
        dtype = self._amp_dtype()
        return torch.autocast("cuda", dtype=dtype) if dtype is not None else nullcontext()

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """Move to the device, DDP-wrap under torchrun, optionally torch.compile."""
        module = module.to(self.device)
        if dist.is_initialized():  # torchrun, also with one process: the same DDP (NCCL/Gloo) code path
            ids = [self.local_rank] if self.device.type == "cuda" else None
            module = torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)
        use_compile = self.options.compile if self.options.compile is not None else self.training_plan.compile
        if use_compile:
            module = torch.compile(module)
        return module

    def validation_arrays(self, case: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(mr, ct, masks)`` of a validation case in memory, cropped by :func:`validation_box` to
        ``training.validation_max_voxels``."""
        limit = self.training_plan.validation_max_voxels
        mr, ct, masks = self.val_data.arrays(case)
        box = validation_box(masks[1], limit)
        if any(s.stop - s.start < n for s, n in zip(box, masks.shape[1:])) and case not in self._cropped_logged:
            self._cropped_logged.add(case)
            log.info("validating %s on a centred crop %s of %d voxels (training.validation_max_voxels)", case,
                     [s.stop - s.start for s in box], limit)
        region = (slice(None), *box)
        return np.array(mr[region]), np.array(ct[region]), np.array(masks[region])

    def validate_synthesis(self, predict: Any) -> dict[str, float]:
        """CT MAE and PSNR (HU) of ``predict`` on every whole validation volume.

        ``predict`` maps a normalised MR tensor (C, z, y, x) to a normalised CT
        tensor (z, y, x); figures cover body voxels with real CT behind them.
        """
        from wldm_auto.io.normalization import denormalise_ct
        from wldm_auto.io.hu import SYNTHRAD_RANGE_HU
        from wldm_auto.io.metrics import mae, psnr

        figures: dict[str, list[float]] = {"mae_ct_hu": [], "psnr_ct": []}
        for case in self.val_data.cases:
            mr, ct, masks = self.validation_arrays(case)
            window = self.val_data.properties(case)["ct_window"]
            with self.autocast():
                sct = predict(torch.from_numpy(mr))
            region = (masks[0] > 0) & (masks[1] > 0)
            sct_hu = denormalise_ct(sct.float().clamp(-1, 1).cpu().numpy(), window)
            ct_hu = denormalise_ct(ct[0], window)
            figures["mae_ct_hu"].append(mae(ct_hu, sct_hu, region))
            figures["psnr_ct"].append(psnr(ct_hu, sct_hu, region, SYNTHRAD_RANGE_HU))
        return {k: float(np.mean(v)) for k, v in figures.items() if v}

    def batches(self, start: int, end: int) -> Any:
        num_workers = self.options.num_workers if self.options.num_workers is not None else default_num_workers()
        data = StepBatches(self.train_data, self.config.patch_size, self.config.batch_size, self.options.seed,
                           augment=True, rank=self.rank, world_size=self.world_size,
                           channel_dropout=self.config.mr_channel_dropout,
                           augment_params=self.config.augmentation, case_sampling=self.config.case_sampling)
        return make_loader(data, start, end, num_workers, pin_memory=self.device.type == "cuda")

    # -- the loop ---------------------------------------------------------------------
    def run(self, resume: bool = False) -> Path:
        """Train until the planned number of steps; returns the final checkpoint's path."""
        if resume:
            self.load(self._resume_path())
            self._complete_epoch_writes(draw=True)
        if self.is_main:
            log.info("%s fold %d: %d train / %d val cases, patch %s, batch %d, steps %d..%d on %s (world size %d)",
                     type(self).__name__, self.fold, len(self.train_data.cases), len(self.val_data.cases),
                     self.config.patch_size, self.config.batch_size, self.step, self.total_steps, self.device,
                     self.world_size)
        stop = self.stop_step = min(self.total_steps, self.options.stop_at_step or self.total_steps)
        self.epoch_started = time.time()
        # "with": the bar ends its line on errors too, so an error message starts on a line of its own
        with tqdm(total=self.total_steps, initial=self.step, desc=f"train {self.stage}", unit="step",
                  disable=not self.is_main) as bar:
            for batch in self.batches(self.step, stop):
                for optimizer, base_lr, _ in self._optimizers.values():
                    for group in optimizer.param_groups:
                        group["lr"] = base_lr * self.lr_factor(self.step)
                losses = self.train_step(batch)
                self.step += 1
                for key, value in losses.items():
                    self.epoch_sums[key] = self.epoch_sums.get(key, 0.0) + float(value)
                self.epoch_count += 1
                bar.update()
                bar.set_postfix({k: f"{v:.4g}" for k, v in list(losses.items())[:3]})
                if self.step % self.steps_per_epoch == 0 or self.step == self.total_steps:
                    self._end_epoch()
                elif self.step % self.training_plan.checkpoint_every_steps == 0 or self.step == stop:
                    self.save("checkpoint_latest.pt")
        if self.step < self.total_steps:
            return self.output / "checkpoint_latest.pt"
        self.save("checkpoint_final.pt")
        if self.world_size > 1:
            dist.barrier()
        return self.output / "checkpoint_final.pt"

    def _end_epoch(self) -> None:
        record: dict[str, Any] = {"epoch": len(self.history), "step": self.step,
                                  "lr": self._optimizers["opt0"][0].param_groups[0]["lr"]}
        record.update({f"train_{k}": v / max(1, self.epoch_count) for k, v in self.epoch_sums.items()})
        if self.is_main:
            for module in self.networks().values():
                module.eval()
            with torch.no_grad():
                record.update({f"val_{k}": v for k, v in self.validate().items()})
            for module in self.networks().values():
                module.train()
        record["epoch_seconds"] = time.time() - self.epoch_started
        self.history.append(record)
        self.epoch_sums, self.epoch_count = {}, 0
        if self.is_main:
            log.info("epoch %d (step %d): %s", record["epoch"], self.step,
                     ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k not in ("epoch", "step")))
            value = record.get(self.best_metric)
            if value is not None and math.isfinite(value) and (
                    self.best_value is None or (value > self.best_value if self.best_mode == "max" else value < self.best_value)):
                self.best_value, self.best_step = value, self.step
        # latest first: a crash after any of the following writes leaves a state --c continues from
        # (resuming repeats the history/progress/best writes of that epoch, see _complete_epoch_writes)
        self.save("checkpoint_latest.pt")
        self._complete_epoch_writes()
        self.epoch_started = time.time()

    def _complete_epoch_writes(self, draw: bool = False) -> None:
        """history.json, progress.png (``draw``, the run's last epoch, or PROGRESS_EVERY_SECONDS since it was
        last drawn), then checkpoint_best.pt if this step is the best (main process only)."""
        if not self.is_main:
            return
        if self.history:
            progress, history = self.output / "progress.png", self.output / "history.json"
            if draw or self.step >= self.stop_step or time.time() - self.progress_drawn >= PROGRESS_EVERY_SECONDS:
                with disk_full_guard(progress):
                    draw_progress(self.history, progress, f"{type(self).__name__} fold {self.fold}")
                self.progress_drawn = time.time()
            with disk_full_guard(history):
                write_json(self.history, history)
        if self.best_step is not None and self.best_step == self.step:
            self.save("checkpoint_best.pt", barrier=False)  # main process only: no barrier

    # -- checkpoints ------------------------------------------------------------------
    def state(self) -> Checkpoint:
        """Everything a prediction needs (the model) and a resumed run needs (``extra``)."""
        return Checkpoint(
            trainer=type(self).__name__,
            step=self.step,
            networks={k: v.state_dict() for k, v in self.networks().items()},
            plans=self.plans.to_dict(),
            stage=self.stage,
            configuration=self.configuration_name,
            fold=self.fold,
            mr_channels=self.train_data.num_mr_channels,
            extra={
                "total_steps": self.total_steps,
                "optimizers": {k: o.state_dict() for k, (o, _, _) in self._optimizers.items()},
                "scalers": {k: sc.state_dict() for k, (_, _, sc) in self._optimizers.items()},
                "rng": rng_state(),
                "history": self.history,
                "epoch_sums": dict(self.epoch_sums),
                "epoch_count": self.epoch_count,
                "best_value": self.best_value,
                "best_step": self.best_step,
                "seed": self.options.seed,
            },
        )

    def save(self, name: str, barrier: bool = True) -> None:
        """Rank 0 writes ``name``; with ``barrier`` every rank waits for it. With several ranks (and
        ``barrier``: every rank is here) the checkpoint also holds each rank's RNG state, so a resumed
        run continues every rank's own random stream."""
        rank_rngs: list[Any] | None = None
        if barrier and self.world_size > 1:
            rank_rngs = [None] * self.world_size
            dist.all_gather_object(rank_rngs, rng_state())
        if self.is_main:
            state = self.state()
            if rank_rngs is not None:
                state.extra["rng_ranks"] = rank_rngs
            save_checkpoint(state, self.output / name)
        if barrier and self.world_size > 1:
            dist.barrier()

    def load(self, path: Path) -> None:
        # on the CPU: RNG states must stay CPU tensors; load_state_dict moves weights and optimizer moments
        state = load_checkpoint(path, map_location="cpu")
        if state.trainer != type(self).__name__:
            raise ValueError(f"{path}: written by {state.trainer}, not {type(self).__name__}")
        extra = state.extra
        for name, module in self.networks().items():
            module.load_state_dict(state.networks[name])
        for name, (optimizer, _, scaler) in self._optimizers.items():
            optimizer.load_state_dict(extra["optimizers"][name])
            if extra["scalers"][name] and scaler.is_enabled():  # a scaler off when saved (bf16, CPU) saved {}
                scaler.load_state_dict(extra["scalers"][name])
        self.step = int(state.step)
        self.history = list(extra["history"])
        self.epoch_sums = dict(extra["epoch_sums"])
        self.epoch_count = int(extra["epoch_count"])
        self.best_value = extra["best_value"]
        best_step = extra.get("best_step")  # absent in checkpoints of older versions
        self.best_step = None if best_step is None else int(best_step)
        own = extra.get("rng_ranks")
        if isinstance(own, list) and len(own) == self.world_size and self.world_size > 1:
            set_rng_state(own[self.rank])
        else:
            set_rng_state(extra["rng"])  # rank 0's
            if self.rank > 0:  # no state of this rank saved (another world size): a stream of its own
                self._seed_everything(self.options.seed + self.rank + 1_000_003 * self.step)
                log.info("rank %d: no RNG state of its own in %s; reseeded from the seed, rank and step",
                         self.rank, path.name)
        self.restore_extra(state)
        log.info("resumed from %s at step %d", path, self.step)

    def restore_extra(self, state: Checkpoint) -> None:
        """Subclasses restore what they added to :meth:`state`."""

    def _resume_path(self) -> Path:
        """The newest complete state: checkpoint_latest.pt, else _final, else _best (each holds everything)."""
        for name in RESUMABLE:
            if (self.output / name).is_file():
                return self.output / name
        raise FileNotFoundError(f"{self.output}: nothing to continue (no {', '.join(RESUMABLE)}); "
                                "start without --c")

    # -- internals --------------------------------------------------------------------
    def _split(self) -> tuple[list[str], list[str]]:
        path = self.preprocessed / "splits_final.json"
        splits = read_json(path)
        if not 0 <= self.fold < len(splits):
            raise ValueError(f"{path}: fold {self.fold} does not exist (folds 0..{len(splits) - 1})")
        return list(splits[self.fold]["train"]), list(splits[self.fold]["val"])

    def _amp_dtype(self) -> torch.dtype | None:
        if self.device.type != "cuda" or not self.training_plan.amp:
            return None
        return torch.bfloat16 if cuda_bf16_native(self.device) else torch.float16

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available (use --device cpu)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if device != "cpu":
        raise ValueError(f"unknown device {device!r} (use cpu, cuda or auto)")
    return torch.device("cpu")


def _init_distributed(device: str) -> tuple[int, int, int]:
    """(rank, world size, local rank); joins the process group under torchrun (one process included)."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    ranks = init_process_group(use_cuda)
    return ranks.rank, ranks.world_size, ranks.local_rank
