"""Samplers that turn a denoiser into samples, independent of any network.

One interface, whatever the algorithm: `set_timesteps(n)` lays out the times from t=1 to
t=0, the denoiser is called at each of `evaluation_times`, and `step(x0, x_t, i)` moves x_t
from times[i] to times[i+1] given the predicted x_0; the call at the last evaluation time
gives the sample itself (its predicted x_0). `denoise_loop` runs any
sampler with any `x0_fn(x_t, t)`, so guidance, clipping and anatomy conditioning are
plain functions wrapped around the network, never branches inside the sampler.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from MedSynLib.diffusion.schedules import TIME_SPACINGS, NoiseSchedule


class Sampler:
    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule
        self.times = torch.empty(0)

    def set_timesteps(self, num_steps: int, spacing: str = "uniform") -> None:
        """Times from 1 to 0: uniform, or quadratic (DPM-Solver's time_quadratic), which ends
        closer to 0, so that a few-step sample's last x_0 estimate is made at low noise."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if spacing not in TIME_SPACINGS:
            raise ValueError(f"time spacing must be one of {TIME_SPACINGS}, got {spacing!r}")
        uniform = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
        self.times = uniform**2 if spacing == "quadratic" else uniform

    @property
    def evaluation_times(self) -> torch.Tensor:
        """The times at which the denoiser is called: t = 1 .. 1/n, the last one's x_0 is the sample."""
        return self.times[:-1]

    def is_last(self, index: int) -> bool:
        return index == len(self.evaluation_times) - 1

    def step(self, x0: torch.Tensor, x_t: torch.Tensor, index: int) -> torch.Tensor:
        raise NotImplementedError

    def _alpha_sigma(self, index: int) -> tuple[float, float]:
        alpha, sigma = self.schedule.alpha_sigma(self.times[index : index + 1])
        return alpha.item(), sigma.item()


class DDIMSampler(Sampler):
    """Deterministic DDIM (eta = 0): x_s = alpha_s x0 + sigma_s * (x_t - alpha_t x0) / sigma_t."""

    def step(self, x0: torch.Tensor, x_t: torch.Tensor, index: int) -> torch.Tensor:
        if self.is_last(index):
            return x0
        alpha_t, sigma_t = self._alpha_sigma(index)
        alpha_s, sigma_s = self._alpha_sigma(index + 1)
        eps = (x_t - alpha_t * x0) / sigma_t
        return alpha_s * x0 + sigma_s * eps


class ReferenceDDIMSampler(DDIMSampler):
    """The MedSyn reference's loop: DDIM moves down its 1000 training steps with the integer
    stride k = int(1000 / n), over t = K k / 1000, ..., k / 1000, 0 with K = 1000 // k (the last
    move to t = 0 itself), then the x_0 predicted at t = 0. For n dividing 1000 that is t = 1,
    1 - 1/n, ..., 0 and n + 1 calls (51 for 50 steps); otherwise the loop starts below t = 1 and
    may take more than n moves (n = 30: t = 0.99 .. 0 by 0.033, 31 moves), as the reference does."""

    training_steps = 1000  # the reference's num_timesteps

    def set_timesteps(self, num_steps: int, spacing: str = "uniform") -> None:
        if spacing != "uniform":
            raise ValueError("ddim_reference follows the reference's uniform stride; time spacing must be 'uniform'")
        if not 1 <= num_steps <= self.training_steps:
            raise ValueError(f"ddim_reference takes 1 to {self.training_steps} steps (the reference strides its "
                             f"{self.training_steps} training steps by int({self.training_steps} / n)), got {num_steps}")
        stride = self.training_steps // num_steps
        moves = self.training_steps // stride
        self.times = torch.arange(moves, -1, -1, dtype=torch.float64) * stride / self.training_steps

    @property
    def evaluation_times(self) -> torch.Tensor:
        return self.times


class DPMSolverPP2MSampler(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022): a second-order multistep solver in data prediction.

    With lambda = log(alpha / sigma) and h = lambda_s - lambda_t:
    x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) D, where D is x0 at the first step
    and (1 + 1/2r) x0_i - (1/2r) x0_{i-1}, r = h_{i-1} / h_i, afterwards. Where both times
    fall where alpha_bar is clamped (many steps), h = 0: the step is the identity and the next
    one starts over at first order.
    """

    def set_timesteps(self, num_steps: int, spacing: str = "uniform") -> None:
        super().set_timesteps(num_steps, spacing)
        self._previous: tuple[torch.Tensor, float] | None = None

    def step(self, x0: torch.Tensor, x_t: torch.Tensor, index: int) -> torch.Tensor:
        if self.is_last(index):
            return x0
        alpha_t, sigma_t = self._alpha_sigma(index)
        alpha_s, sigma_s = self._alpha_sigma(index + 1)
        h = float(torch.log(torch.tensor(alpha_s / sigma_s)) - torch.log(torch.tensor(alpha_t / sigma_t)))
        if h == 0.0:
            self._previous = None
            return x_t
        derivative = x0
        if self._previous is not None:
            previous_x0, previous_h = self._previous
            r = previous_h / h
            derivative = (1 + 0.5 / r) * x0 - (0.5 / r) * previous_x0
        self._previous = (x0, h)
        return (sigma_s / sigma_t) * x_t - alpha_s * torch.expm1(torch.tensor(-h)).item() * derivative


SAMPLERS: dict[str, type[Sampler]] = {
    "ddim": DDIMSampler,
    "dpm++2m": DPMSolverPP2MSampler,
    "ddim_reference": ReferenceDDIMSampler,
}


def make_sampler(name: str, schedule: NoiseSchedule, num_steps: int, spacing: str = "uniform") -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {name!r}")
    sampler = SAMPLERS[name](schedule)
    sampler.set_timesteps(num_steps, spacing)
    return sampler


def classifier_free_guidance(conditional: torch.Tensor, unconditional: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + w (cond - uncond), written so that w = 1 gives exactly the conditional output."""
    return conditional + (scale - 1.0) * (conditional - unconditional)


def denoise_loop(
    x0_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_T: torch.Tensor,
    sampler: Sampler,
    *,
    after_step: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Integrate from t=1 to t=0. `after_step(x, i)` may edit x at times[i+1] (e.g. to impose anatomy)."""
    x = x_T
    steps = len(sampler.evaluation_times)
    for index in range(steps):
        t = sampler.evaluation_times[index].float().expand(x.shape[0]).to(x.device)
        x = sampler.step(x0_fn(x, t), x, index)
        if after_step is not None:
            x = after_step(x, index)
        if progress is not None:
            progress(index + 1, steps)
    return x
