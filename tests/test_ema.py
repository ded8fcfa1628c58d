"""Weight averages: the update rule, and a VAE trained with one (what it saves, what later stages load)."""
from __future__ import annotations

import pytest
import torch

from wldm_auto.models.checkpoint import load_checkpoint
from wldm_auto.models.loading import load_frozen_vae
from wldm_auto.trainers.base import TrainerOptions
from wldm_auto.trainers.ema import ema_copy, update_ema
from wldm_auto.trainers.run import run_training

from conftest import tiny_copy


def test_update_ema_hand_values() -> None:
    live = torch.nn.BatchNorm1d(2)
    ema = ema_copy(live)
    assert not any(p.requires_grad for p in ema.parameters())
    with torch.no_grad():
        live.weight.copy_(torch.tensor([2.0, 3.0]))
        live.running_mean.copy_(torch.tensor([5.0, 6.0]))
    update_ema(ema, live, 0.75)  # 0.75 * 1 + 0.25 * live
    assert torch.allclose(ema.weight, torch.tensor([1.25, 1.5]))
    assert torch.equal(ema.running_mean, torch.tensor([5.0, 6.0]))  # buffers are copied, not averaged


def test_vae_with_ema_saves_the_average_for_later_stages(preprocessed_small, tmp_path, monkeypatch):
    dataset = tiny_copy(preprocessed_small, tmp_path, monkeypatch, ema_decay=0.5)
    options = TrainerOptions(device="cpu", num_workers=0, num_steps=4, steps_per_epoch=2)
    final = run_training(dataset, "vae", 0, options=options)
    networks = load_checkpoint(final)["networks"]
    average, trained = networks["vae"], networks["vae_train"]
    assert average.keys() == trained.keys()
    assert any(not torch.equal(average[k], trained[k]) for k in average)
    vae, _ = load_frozen_vae(final, torch.device("cpu"))  # the diffusion stage and prediction get the average
    for name, value in vae.state_dict().items():
        assert torch.equal(value, average[name]), name


@pytest.mark.parametrize("decay", [0.5])
def test_vae_with_ema_resumes_to_identical_weights(preprocessed_small, tmp_path, monkeypatch, decay):
    dataset = tiny_copy(preprocessed_small, tmp_path / "a", monkeypatch, ema_decay=decay)
    straight = run_training(dataset, "vae", 0, options=TrainerOptions(device="cpu", num_workers=0, num_steps=4,
                                                                     steps_per_epoch=2))
    dataset = tiny_copy(preprocessed_small, tmp_path / "b", monkeypatch, ema_decay=decay)
    run_training(dataset, "vae", 0, options=TrainerOptions(device="cpu", num_workers=0, num_steps=4,
                                                          steps_per_epoch=2, stop_at_step=2))
    resumed = run_training(dataset, "vae", 0, resume=True,
                           options=TrainerOptions(device="cpu", num_workers=0, num_steps=4, steps_per_epoch=2))
    a, b = load_checkpoint(straight)["networks"], load_checkpoint(resumed)["networks"]
    for net in ("vae", "vae_train"):
        for key in a[net]:
            assert torch.equal(a[net][key], b[net][key]), (net, key)
