"""Centred latents (plan diffusion.center_latents) on a VAE with the lossless shortcut (vae.shortcut): the shift is
measured at training, stored in the checkpoint, applied at prediction, and cancels in encode -> decode."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import tiny_copy
from wldm_auto.inference.folds import load_model
from wldm_auto.models.checkpoint import load_checkpoint
from wldm_auto.trainers.base import TrainerOptions
from wldm_auto.trainers.run import run_training


@pytest.fixture(scope="module")
def centred(preprocessed_small, tmp_path_factory):
    monkeypatch = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("centred")
    dataset = tiny_copy(preprocessed_small, root, monkeypatch, latent_channels=8, shortcut=8)
    plans_path = root / "pre" / dataset / "plans.json"
    plans = json.loads(plans_path.read_text())
    plans["configurations"]["3d_wldm"]["diffusion"]["center_latents"] = True
    plans_path.write_text(json.dumps(plans))
    options = TrainerOptions(device="cpu", num_workers=0, num_steps=4, steps_per_epoch=4)
    run_training(dataset, "vae", 0, options=options)
    final = run_training(dataset, "diffusion", 0, options=options)
    yield {"final": final, "folder": preprocessed_small.folder}
    monkeypatch.undo()


def test_shift_is_measured_stored_and_applied(centred):
    state = load_checkpoint(centred["final"])
    shift = np.asarray(state["latent_shift"])
    assert shift.shape == (8,) and state["latent_scale"] > 0
    # the lossless shortcut's CT latent is (about) the CT itself: mostly soft tissue and air, well below 0
    assert np.all(shift < -0.2) and np.all(shift > -1.0), shift
    synthesizer = load_model(centred["final"].parent.parent, [0], torch.device("cpu"))[0].synthesizer
    assert synthesizer.latent_shift == pytest.approx(list(shift))
    ct = torch.from_numpy(np.load(sorted(centred["folder"].glob("*_ct.npy"))[0]).astype(np.float32))
    ct = ct[..., : ct.shape[-3] // 2 * 2, : ct.shape[-2] // 2 * 2, : ct.shape[-1] // 2 * 2]
    z = synthesizer.encode(ct, "ct")
    raw = synthesizer.vae.encode(ct[None], "ct").mode()[0] * synthesizer.latent_scale
    # centred: each channel's mean near 0, where the uncentred latent's is far from it
    assert z.mean(dim=(1, 2, 3)).abs().max() < 0.5 * raw.mean(dim=(1, 2, 3)).abs().min()
    # the shift cancels through encode -> decode: the same CT as the VAE alone gives
    direct = synthesizer.vae.decode(synthesizer.vae.encode(ct[None], "ct").mode(), "ct")[0, 0]
    assert torch.allclose(synthesizer.decode_ct(z, ct.shape[-3:]), direct, atol=1e-4)

