"""wldm_train: train one stage of one fold, from a plan, on CPU or GPU (torchrun for several)."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn

from wldm_auto.cli.common import run_cli, setup_logging

DESCRIPTION = """\
Train a stage of the model for one cross-validation fold.

  wldm_train 001 vae -f 0            stage 1: the shared MR/CT wavelet VAE
  wldm_train 001 vae -f 0 --c        continue from checkpoint_latest.pt, exactly
  wldm_train 001 diffusion -f 0      stage 2: latent diffusion with DSCA on the fold's frozen VAE
  wldm_train 001 wavelet_diffusion -f 0
                                     WDM-style alternative: diffusion on fixed Haar sub-bands
                                     (plan section wavelet_diffusion; no VAE needed, no DSCA)
  wldm_train 001 regression -f 0     baseline: plain 3D U-Net, masked L1 (fast; no VAE needed)
  wldm_train 001 residual_diffusion -f 0
                                     beyond the paper: diffusion of the residual CT - regression sCT,
                                     on the fold's trained regression U-Net (train that first)
  torchrun --nproc_per_node 4 -m wldm_auto.cli.train 001 vae -f 0
                                     the same on 4 GPUs (DistributedDataParallel)

Results: $wldm_results/DatasetXXX_Name/<Trainer>__<plans>__<configuration>/fold_F/
with checkpoint_latest.pt / checkpoint_best.pt / checkpoint_final.pt, progress.png,
history.json and a training log. Everything else comes from plans.json.

Several MR sequences (imagesTr CASE_0000, CASE_0001, ...) are all used; with the
plan's mr_channel_dropout (0.5 when there are several) each training sample sees
a random subset, flagged, so the model also works when sequences are missing.
"""


MAX_SEED = 2**63 - 1  # torch.manual_seed's range (the seed plus the rank must fit)


class _Parser(argparse.ArgumentParser):
    """Reports a bad command line in one line (no usage block), before anything is created."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} -h)\n")


def _integer(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """argparse type: a whole number in [``minimum``, ``maximum``] ("10", not "10.0" or "1e4")."""
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    if maximum is not None:
        what = f"an integer from {minimum} to {maximum}"

    def convert(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    convert.__name__ = what  # argparse names the type in some messages
    return convert


def main(argv: list[str] | None = None) -> int:
    from wldm_auto.trainers.registry import TRAINERS

    parser = _Parser(prog="wldm_train", description=DESCRIPTION,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="dataset id or name: 1, 001 or Dataset001_Name")
    parser.add_argument("stage", choices=sorted({c.stage for c in TRAINERS.values()}), help="what to train")
    parser.add_argument("-f", "--fold", type=_integer(0), default=0, help="cross-validation fold (default 0)")
    parser.add_argument("-tr", "--trainer", choices=sorted(TRAINERS), help="trainer class (default: the stage's full model)")
    parser.add_argument("-c", "--configuration", default="3d_wldm", help="configuration in plans.json (default 3d_wldm)")
    parser.add_argument("--c", dest="resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda if available")
    parser.add_argument("--seed", type=_integer(0, MAX_SEED), default=12345,
                        help="seed for weights, batches and augmentation")
    parser.add_argument("--steps", type=_integer(1),
                        help="total training steps (overrides the plan's epochs x steps per epoch)")
    parser.add_argument("--epochs", type=_integer(1), help="number of epochs (overrides the plan)")
    parser.add_argument("--steps-per-epoch", type=_integer(1),
                        help="steps per epoch = validation interval (overrides the plan)")
    parser.add_argument("--num-workers", type=_integer(0),
                        help="background augmentation workers (default: CPU cores - 1, max 8)")
    parser.add_argument("--compile", action="store_true", default=None, help="torch.compile the networks")
    parser.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower on GPU)")
    parser.add_argument("--vae-trainer",
                        help="stage 2: take the VAE of this stage-1 trainer (default: the one the diffusion trainer "
                             "pairs with: VAETrainer, or the matching ablation VAE for the ablation trainers)")
    parser.add_argument("--prior-trainer",
                        help="residual_diffusion: the regression trainer whose U-Net is the prior (default "
                             "RegressionTrainer)")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)

    def action() -> int:
        from wldm_auto.trainers.base import TrainerOptions
        from wldm_auto.trainers.run import run_training

        options = TrainerOptions(device=args.device, seed=args.seed, num_steps=args.steps, num_epochs=args.epochs,
                                 steps_per_epoch=args.steps_per_epoch, num_workers=args.num_workers,
                                 compile=args.compile, deterministic=args.deterministic,
                                 vae_trainer=args.vae_trainer, prior_trainer=args.prior_trainer)
        try:
            path = run_training(args.dataset, args.stage, args.fold, args.trainer, args.configuration, args.resume,
                                options)
        finally:  # leave the process group a torchrun launch joined (NCCL warns at exit otherwise)
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        print(f"training stopped at {path}")
        return 0

    return run_cli(action, "interrupted: continue with --c")


if __name__ == "__main__":
    sys.exit(main())
