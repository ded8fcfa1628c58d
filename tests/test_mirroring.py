"""Test-time mirroring: flips, their order, draws per sample, the posterior-mean average, plan/CLI checks."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from wldm_auto.diffusion.ranks import RankShare
from wldm_auto.inference.folds import check_mirror_axes, mirrored
from wldm_auto.models.factory import build_regression_unet
from wldm_auto.models.mirroring import MirroredSynthesizer, mirrorings
from wldm_auto.models.regression import RegressionSynthesizer
from wldm_auto.planners.schema import (AugmentationPlan, ConfigurationPlan, InferencePlan, PlanError, RegressionPlan,
                                       parse_section)


def test_mirrorings_are_every_subset_identity_first() -> None:
    assert mirrorings([]) == [()]
    assert mirrorings([2, 0]) == [(), (2,), (0,), (0, 2)]
    three = mirrorings([0, 1, 2])
    assert len(three) == 8 and three[0] == () and len(set(three)) == 8 and (0, 1, 2) in three


def test_deterministic_model_gives_one_draw_per_mirroring() -> None:
    torch.manual_seed(0)
    net = build_regression_unet(1, RegressionPlan(unet_channels=[8, 16], group_width=4, blocks_per_level=1)).eval()
    base = RegressionSynthesizer(net, [8, 16, 16], overlap=0.5)
    mr = torch.rand(1, 10, 18, 22) * 2 - 1
    synth = MirroredSynthesizer(base, (2, 1))
    assert synth.axes == (1, 2) and synth.draws_per_sample == 4 and not synth.is_stochastic
    draws = synth.sample(mr, None, num_samples=1)
    assert draws.shape == (4, 10, 18, 22)
    plain = base.predict(mr)
    assert torch.equal(draws[0], plain)  # the identity first, untouched
    for k, flips in enumerate(mirrorings((1, 2))):  # each flipped back onto the MR's grid
        dims = [a + 1 for a in flips]
        expected = torch.flip(base.predict(torch.flip(mr, dims)), [a for a in flips]) if flips else plain
        assert torch.allclose(draws[k], expected, atol=1e-6), flips
    # a U-Net is not flip-equivariant: the mirrorings disagree, which is the std map they give
    assert (draws.std(0) > 0).float().mean() > 0.5
    assert synth.mean_estimate(mr) is None  # the regression model's sCT is the mean of the draws
    share = RankShare(0, 2)
    synth.share = share  # --split-case reaches the wrapped model
    assert base.share is share and synth.share is share
    with pytest.raises(TypeError, match="cannot spread its work"):
        MirroredSynthesizer(PointwiseModel(), (0,)).share = share


@dataclass
class PointwiseModel:
    """A flip-equivariant stochastic stand-in: sample k is mr[0] + k, estimate mr[0] ** 2."""

    is_stochastic: bool = True
    estimate: bool = True

    def sample(self, mr, steps, eta=0.0, num_samples=1, generator=None, progress=False, available=None):
        return torch.stack([mr[0] + k for k in range(num_samples)])

    def mean_estimate(self, mr, generator=None, available=None):
        return mr[0] ** 2 if self.estimate else None


def test_stochastic_model_draws_every_sample_per_mirroring_and_averages_estimates() -> None:
    mr = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4)
    synth = MirroredSynthesizer(PointwiseModel(), (0, 1, 2))
    draws = synth.sample(mr, 3, num_samples=2)
    assert draws.shape == (16, 2, 3, 4) and synth.is_stochastic
    for m in range(8):  # mirroring-major: the 2 samples of the identity, then of each flip; all back on the grid
        assert torch.equal(draws[2 * m], mr[0]) and torch.equal(draws[2 * m + 1], mr[0] + 1)
    assert torch.equal(synth.mean_estimate(mr), mr[0] ** 2)
    assert MirroredSynthesizer(PointwiseModel(estimate=False), (0,)).mean_estimate(mr) is None


def test_bad_axes_are_refused_everywhere() -> None:
    for axes in ((), (3,), (0, -1)):
        with pytest.raises(ValueError, match="mirror axes"):
            MirroredSynthesizer(PointwiseModel(), axes)
    assert check_mirror_axes(None) is None and check_mirror_axes([2, 0]) == [0, 2] and check_mirror_axes([]) == []
    with pytest.raises(ValueError, match="distinct axes among 0, 1, 2"):
        check_mirror_axes([1, 1], "--mirror-axes")
    assert parse_section(InferencePlan, {"mirror_axes": [0, 2]}, "inference").mirror_axes == [0, 2]
    for bad in ([0, 0], [3]):
        with pytest.raises(PlanError, match="inference.mirror_axes"):
            parse_section(InferencePlan, {"mirror_axes": bad}, "inference")
    from wldm_auto.cli.predict import main as predict_main
    with pytest.raises(SystemExit) as exc:
        predict_main(["-i", "x", "-o", "y", "-m", "z", "--mirror-axes", "3"])
    assert exc.value.code == 2


def test_axes_never_flipped_in_training_are_warned_about(caplog) -> None:
    def config(inference_axes, trained_axes, p_mirror=1.0):
        return ConfigurationPlan(data_identifier="m", spacing=[2.0] * 3, median_shape=[16] * 3, patch_size=[16] * 3,
                                 batch_size=1, estimated_memory_gb=0.0,
                                 inference=InferencePlan(mirror_axes=inference_axes),
                                 augmentation=AugmentationPlan(p_mirror=p_mirror, mirror_axes=trained_axes))
    base = PointwiseModel()
    path = Path("model/fold_0/checkpoint_final.pt")
    assert mirrored(base, config([], [0, 1, 2]), path) is base  # off: the model as it is
    with caplog.at_level(logging.WARNING, logger="wldm_auto.inference"):
        assert isinstance(mirrored(base, config([1, 2], [0, 1, 2]), path), MirroredSynthesizer)
        assert not caplog.records
        mirrored(base, config([0, 2], [2]), path)
        assert "never saw" in caplog.text and "[0]" in caplog.text
        caplog.clear()
        mirrored(base, config([2], [2], p_mirror=0.0), path)
        assert "training flipped only none" in caplog.text


def test_first_stage_of_a_mirrored_model_is_the_wrapped_one():
    """The ceiling (encode -> decode of the true CT) goes through the wrapped model: test-time mirroring has no
    first stage of its own, and the benchmark stopped on a mirrored model's ceiling before."""
    from wldm_auto.inference.first_stage import first_stage_of
    from wldm_auto.models.latent import LatentSynthesizer
    from wldm_auto.networks.haar import HaarFirstStage

    latent = LatentSynthesizer(HaarFirstStage(1), torch.nn.Identity(), None, 1.0, [8, 8, 8])
    assert first_stage_of(latent) is latent
    assert first_stage_of(MirroredSynthesizer(latent, (0, 1, 2))) is latent
    assert first_stage_of(MirroredSynthesizer(PointwiseModel(), (0,))) is None
    assert first_stage_of(None) is None
