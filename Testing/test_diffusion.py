"""Schedules, prediction types, the training loss and the samplers, against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from MedSynLib.diffusion.consistency import LowFrequencyConsistency, gaussian_blur, interpolate_samples
from MedSynLib.diffusion.objective import DiffusionObjective, training_target
from MedSynLib.diffusion.samplers import SAMPLERS, classifier_free_guidance, denoise_loop, make_sampler
from MedSynLib.diffusion.schedules import (
    SCHEDULES,
    CosineSchedule,
    DiffusionConfig,
    LinearSchedule,
    add_noise,
    prediction_to_x0,
)

MEAN, STD = 0.5, 0.3  # the Gaussian "data" of the analytic tests


def test_cosine_schedule_is_the_reference_formula():
    schedule = CosineSchedule()
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    alpha, sigma = schedule.alpha_sigma(t)
    expected = (torch.cos((t.double() + 0.008) / 1.008 * torch.pi / 2) ** 2).clamp(1e-4, 1 - 1e-4)
    assert torch.allclose(alpha.double() ** 2, expected, atol=1e-6)
    assert torch.allclose(alpha**2 + sigma**2, torch.ones(4), atol=1e-6)
    assert alpha[-1] ** 2 == pytest.approx(1e-4, rel=1e-3)


@pytest.mark.parametrize("schedule", [CosineSchedule(), LinearSchedule()])
def test_schedules_decrease_from_data_to_noise(schedule):
    alpha, _ = schedule.alpha_sigma(torch.linspace(0, 1, 101))
    assert (alpha[1:] <= alpha[:-1]).all() and (alpha[1:90] < alpha[:89]).all()
    assert alpha[0] > 0.99 and alpha[-1] < 0.02


@pytest.mark.parametrize("prediction_type", ["x0", "epsilon", "v"])
def test_prediction_types_recover_x0(prediction_type):
    schedule = CosineSchedule()
    x0, noise, t = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0.1, 0.4, 0.7, 0.95])
    x_t = add_noise(x0, noise, t, schedule)
    target = training_target(x0, noise, t, schedule, prediction_type)
    assert torch.allclose(prediction_to_x0(target, x_t, t, schedule, prediction_type), x0, atol=1e-3)


@pytest.mark.parametrize("prediction_type", ["x0", "epsilon", "v"])
def test_loss_is_zero_for_the_oracle_and_positive_otherwise(prediction_type):
    objective = DiffusionObjective(CosineSchedule(), prediction_type)
    x0, noise, t = torch.randn(3, 2, 4, 4, 4), torch.randn(3, 2, 4, 4, 4), torch.tensor([0.1, 0.5, 0.9])
    schedule = objective.schedule

    def oracle(x_t, t):  # knows x0 and the noise: predicts exactly the target
        return training_target(x0, noise, t, schedule, prediction_type)

    def given_x_t(x_t, t):  # the objective must hand over q(x_t | x0) at the same t
        assert torch.allclose(x_t, add_noise(x0, noise, t, schedule))
        return torch.zeros_like(x_t)

    assert objective.loss(oracle, x0, noise, t) == 0
    assert objective.loss(given_x_t, x0, noise, t) > 0.5


def test_config_validates_names():
    with pytest.raises(ValueError, match="schedule"):
        DiffusionConfig(schedule="sigmoid")
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusionConfig(prediction_type="score")


def gaussian_x0(schedule):
    """The exact denoiser E[x0 | x_t] for data ~ N(MEAN, STD^2)."""

    def x0_fn(x_t, t):
        alpha, sigma = (v[:, None] for v in schedule.alpha_sigma(t))
        return MEAN + alpha * STD**2 / (alpha**2 * STD**2 + sigma**2) * (x_t - alpha * MEAN)

    return x0_fn


def sample_gaussian(sampler_name, steps, schedule=None, n=100_000, spacing="uniform"):
    schedule = schedule or CosineSchedule()
    x_T = torch.randn(n, 1, generator=torch.Generator().manual_seed(0))
    return denoise_loop(gaussian_x0(schedule), x_T, make_sampler(sampler_name, schedule, steps, spacing))


@pytest.mark.parametrize(("sampler", "steps"), [("ddim", 50), ("dpm++2m", 20)])
def test_samplers_reproduce_the_data_distribution(sampler, steps):
    samples = sample_gaussian(sampler, steps)
    assert samples.mean().item() == pytest.approx(MEAN, abs=0.01)
    assert samples.std().item() == pytest.approx(STD, rel=0.06)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_every_sampler_and_schedule_takes_many_steps(sampler, schedule):
    # From ~156 cosine (24 linear) steps on, neighbouring times share the clamped alpha_bar.
    samples = sample_gaussian(sampler, 1000, SCHEDULES[schedule](), n=2_000)
    assert torch.isfinite(samples).all()
    assert samples.mean().item() == pytest.approx(MEAN, abs=0.1)
    assert samples.std().item() == pytest.approx(STD, rel=0.1)


def test_samplers_converge_and_the_second_order_one_faster():
    def error(name, steps):
        return abs(sample_gaussian(name, steps, n=20_000).std().item() - STD)

    assert error("ddim", 200) < 0.5 * error("ddim", 25)
    assert error("dpm++2m", 20) < error("ddim", 20)


def test_quadratic_spacing_ends_its_few_steps_at_low_noise_and_still_samples_the_data():
    sampler = make_sampler("dpm++2m", CosineSchedule(), 3, "quadratic")
    assert torch.allclose(sampler.times, torch.tensor([1.0, 4 / 9, 1 / 9, 0.0], dtype=torch.float64))
    assert sampler.evaluation_times[-1] == pytest.approx(1 / 9)  # uniform: 1/3
    for name, steps in (("ddim", 50), ("dpm++2m", 20)):  # as the uniform spacing's test
        samples = sample_gaussian(name, steps, spacing="quadratic")
        assert samples.mean().item() == pytest.approx(MEAN, abs=0.01)
        assert samples.std().item() == pytest.approx(STD, rel=0.06)
    with pytest.raises(ValueError, match="uniform"):
        make_sampler("ddim_reference", CosineSchedule(), 10, "quadratic")
    with pytest.raises(ValueError, match="time_spacing"):
        DiffusionConfig(time_spacing="cubic")


def test_classifier_free_guidance_scale_one_is_conditional_and_zero_unconditional():
    conditional, unconditional = torch.randn(5), torch.randn(5)
    assert torch.equal(classifier_free_guidance(conditional, unconditional, 1.0), conditional)
    assert torch.allclose(classifier_free_guidance(conditional, unconditional, 0.0), unconditional, atol=1e-6)
    guided = classifier_free_guidance(conditional, unconditional, 3.0)
    assert torch.allclose(guided, unconditional + 3 * (conditional - unconditional))


def test_denoise_loop_reports_progress_and_unknown_sampler_fails():
    calls = []
    denoise_loop(lambda x, t: x, torch.zeros(1, 1), make_sampler("ddim", CosineSchedule(), 3),
                 progress=lambda i, n: calls.append((i, n)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    with pytest.raises(ValueError, match="sampler"):
        make_sampler("euler", CosineSchedule(), 3)


def test_reference_cosine_schedule_clamps_as_the_reference_code_does():
    """src/utils.py clamps alpha_bar to [1e-4, 1 - 1e-4] (only t = 1 is affected): the cosine schedule."""
    schedule = SCHEDULES["cosine_reference"]()
    t = torch.linspace(0, 1, 101)
    torch.testing.assert_close(schedule.alpha_sigma(t), CosineSchedule().alpha_sigma(t), atol=0, rtol=0)
    alpha, sigma = schedule.alpha_sigma(torch.tensor([1.0, 0.0]))
    assert alpha[0] ** 2 == pytest.approx(1e-4, rel=1e-5) and sigma[0] ** 2 == pytest.approx(1 - 1e-4, rel=1e-6)
    assert alpha[1] ** 2 == pytest.approx(math.cos(0.008 / 1.008 * math.pi / 2) ** 2, rel=1e-6)  # 0.999845


def reference_alpha_bar(t: float) -> float:
    """The reference's get_alpha_cum for t >= 0."""
    return min(max(math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2, 1e-4), 1 - 1e-4)


@pytest.mark.parametrize("n", [5, 7, 30, 300])
def test_reference_ddim_loop_matches_a_direct_computation_of_the_reference_loop(n):
    """The reference walks its integer times range(0, 1001, int(1000 / n)) downwards, a DDIM move
    from each to the next, and returns the x0 predicted at t = 0; n need not divide 1000."""
    schedule = SCHEDULES["cosine_reference"]()
    weights = torch.tensor([0.3, -0.7, 1.1])

    def denoiser(x, t):  # any smooth, time-dependent x0 prediction, clipped as the reference does
        return torch.tanh(x * weights + t[:, None]).clamp(-1, 1)

    calls = []

    def counted(x, t):
        calls.append(float(t[0]))
        return denoiser(x, t)

    x_T = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    sample = denoise_loop(counted, x_T, make_sampler("ddim_reference", schedule, n))
    stride = int(1000 / n)
    times = list(reversed(range(0, 1000 + 1, stride)))
    assert calls == pytest.approx([t / 1000 for t in times])

    x = x_T.double()
    for t in times:
        x0 = denoiser(x.float(), torch.full((2,), t / 1000)).double()
        if t < stride:
            x = x0
            break
        eps = (x - math.sqrt(reference_alpha_bar(t / 1000)) * x0) / math.sqrt(1 - reference_alpha_bar(t / 1000))
        s = (t - stride) / 1000
        x = math.sqrt(reference_alpha_bar(s)) * x0 + math.sqrt(1 - reference_alpha_bar(s)) * eps
    torch.testing.assert_close(sample, x.float(), atol=1e-5, rtol=1e-5)
    # Our DDIM instead returns the x0 predicted at t = 1/n after n calls.
    calls.clear()
    denoise_loop(counted, x_T, make_sampler("ddim", schedule, n))
    assert len(calls) == n and calls[-1] == pytest.approx(1 / n)


def test_reference_ddim_loop_refuses_more_steps_than_the_reference_has():
    with pytest.raises(ValueError, match="1 to 1000 steps"):
        make_sampler("ddim_reference", CosineSchedule(), 1001)


def test_gaussian_blur_keeps_constants_and_sums_a_point_to_one():
    constant = torch.full((1, 2, 6, 7, 8), 0.3)
    assert torch.allclose(gaussian_blur(constant, 1.5), constant, atol=1e-6)
    point = torch.zeros(1, 1, 15, 15, 15)
    point[0, 0, 7, 7, 7] = 1.0
    blurred = gaussian_blur(point, 1.5)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert blurred[0, 0, 7, 7, 7] < 0.1 and torch.allclose(blurred, blurred.flip([2, 3, 4]), atol=1e-7)


def test_sample_interpolation_goes_through_the_sampled_voxels():
    low = torch.randn(1, 2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    up = interpolate_samples(low, 4)
    assert up.shape == (1, 2, 16, 16, 16)
    assert torch.allclose(up[..., ::4, ::4, ::4], low, atol=1e-6)
    assert torch.allclose(up[..., 2, 0, 0], (low[..., 0, 0, 0] + low[..., 1, 0, 0]) / 2, atol=1e-6)
    assert torch.equal(up[..., 13:, :, :], up[..., 12:13, :, :].expand_as(up[..., 13:, :, :]))  # past the last sample


def test_low_frequency_consistency_removes_a_bias_and_keeps_detail_and_anatomy():
    generator = torch.Generator().manual_seed(1)
    low = gaussian_blur(torch.randn(1, 3, 8, 8, 8, generator=generator), 1.0)
    truth = interpolate_samples(low, 2)
    z, y, x = torch.meshgrid(*(torch.arange(16),) * 3, indexing="ij")
    detail = 0.05 * (-1.0) ** (z + y + x)  # the finest pattern the grid holds: above any low-pass band
    x0 = truth + 0.3 + detail
    corrected = LowFrequencyConsistency(low, 2, channels=[0, 1], sigma=1.5)(x0)
    inside = (slice(None), slice(None), *(slice(5, 11),) * 3)  # away from the replicated edges
    assert torch.allclose(corrected[:, :2][inside], (truth + detail)[:, :2][inside], atol=2e-3)
    assert torch.equal(corrected[:, 2:], x0[:, 2:])  # other channels are not touched
    with pytest.raises(ValueError, match="sigma"):
        LowFrequencyConsistency(low, 2, channels=[0, 1], sigma=0.0)


def test_low_frequency_consistency_leaves_thin_structures_to_stage2():
    low = torch.zeros(1, 2, 8, 8, 8)
    x0 = torch.full((1, 2, 16, 16, 16), 0.5)
    x0[:, 1] = -1.0
    x0[:, 1, 8, 8, 8] = 1.0  # one airway voxel in the x0 estimate
    corrected = LowFrequencyConsistency(low, 2, channels=[0], sigma=1.5, exempt=[1])(x0)
    assert torch.equal(corrected[0, 0, 7:10, 7:10, 7:10], x0[0, 0, 7:10, 7:10, 7:10])  # the voxel and its neighbours
    assert corrected[0, 0, 8, 8, 11].item() == pytest.approx(0.0, abs=1e-5)  # elsewhere the bias goes


def test_tissue_wise_consistency_keeps_the_lung_edge_sharp_and_the_lungs_where_stage1_has_them():
    low = torch.full((1, 2, 8, 8, 8), 0.1)  # channel 0 CT, channel 1 lung mask
    low[:, 0, :, :, :4], low[:, 1, :, :, :4], low[:, 1, :, :, 4:] = -0.9, 1.0, -1.0  # lung on the low x side
    x0 = torch.full((1, 2, 16, 16, 16), 0.4)  # stage 2: a tissue bias of +0.3 ...
    x0[:, 0, :, :, :8], x0[:, 1, :, :, :8], x0[:, 1, :, :, 8:] = -0.6, 1.0, -1.0  # ... and +0.3 in the lung
    x0[:, 1, :, :, 8:10] = 1.0  # and its lung reaches two voxels too far
    tissue_wise = LowFrequencyConsistency(low, 2, channels=[0], sigma=1.0, tissue=[1])(x0)
    middle = (0, 0, 8, 8)
    assert torch.allclose(tissue_wise[middle][:6], torch.full((6,), -0.9), atol=1e-3)  # lung density: stage 1's
    assert torch.allclose(tissue_wise[middle][12:], torch.full((4,), 0.1), atol=1e-3)  # tissue density: stage 1's
    lung_edge = int((tissue_wise[0, 1, 8, 8] > 0).float().sum())  # lung voxels along x
    assert lung_edge < 10  # the mask went back toward stage 1's edge (voxel 7 interpolated)
    step = tissue_wise[middle][lung_edge] - tissue_wise[middle][lung_edge - 1]
    assert step.item() > 0.9  # one voxel from lung to tissue density, not a ramp


def test_lowres_consistency_is_validated():
    assert DiffusionConfig().lowres_consistency == 0.0
    with pytest.raises(ValueError, match="lowres_consistency"):
        DiffusionConfig(lowres_consistency=-1.0)
