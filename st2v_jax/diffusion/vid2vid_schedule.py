"""MS-Vid2Vid-XL's diffusion: its noise schedule, guidance with rescale and its DPM-Solver++(2M)
SDE sampler, reproducing modelscope's `schedules_sdedit`, `GaussianDiffusion_SDEdit` and
`solvers_sdedit` (the refiner of the StreamingT2V release).

Schedule. A log-SNR table over 1000 steps: the cosine log-SNR curve (log-SNR in [-15, 15])
shifted by -2 log(2) at t = 0 and by -2 log(4) at t = 999, interpolated linearly in t between
the two shifts; sigma_t = sqrt(sigmoid(-logsnr_t)) is the noise std, alpha_t = sqrt(1 -
sigma_t^2), then sigma is stretched so that sigma_999 = 1 (zero terminal SNR). The network
predicts v, so x0 = alpha_t x_t - sigma_t v.

Sampler. modelscope samples in the variance-exploding variable x = x_t / alpha_t with noise
level s = sigma_t / alpha_t (k-diffusion's sigma): the timesteps t_max ... t_min are spaced
("trailing" by default), turned into levels s by log-linear interpolation of the table, the
last level is 0, and with DPM-Solver++(2M) SDE the penultimate level is dropped (so 30 steps
ask for 31 timesteps). At step i the model sees x * 1/sqrt(s_i^2 + 1) at the integer
timestep round(t(s_i)), and its x0 uses the table's alpha/sigma at that integer timestep.
With eta = 1 and h = log(s_i / s_{i+1}):
    x <- (s_{i+1} / s_i) e^{-h} x + (1 - e^{-2h}) x0
         + [after the first step] 0.5 (1 - e^{-2h}) (h / h_prev) (x0 - x0_prev)
         + s_{i+1} sqrt(1 - e^{-2h}) z,       and x <- x0 on the last step (s = 0).
modelscope draws z from a Brownian tree (torchsde); its increments over the disjoint step
intervals are independent standard normals, which is what z is here.

The release starts from latents noised to t_max = 599 (alpha_599 x0 + sigma_599 eps) and then,
like modelscope's `sample`, multiplies them by s_0 as if they were unit noise. That is kept:
`SDEPlan.start_scale`.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array

DISCRETIZATIONS = ("trailing", "linspace", "leading")


@dataclasses.dataclass(frozen=True)
class LogSNRCosineSchedule:
    """modelscope `noise_schedule('logsnr_cosine_interp', ...)`; defaults are MS-Vid2Vid-XL's."""

    num_timesteps: int = 1000
    logsnr_min: float = -15.0
    logsnr_max: float = 15.0
    scale_min: float = 2.0
    scale_max: float = 4.0
    zero_terminal_snr: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.num_timesteps < 2:
            problems.append(f"num_timesteps must be >= 2, got {self.num_timesteps}")
        if not self.logsnr_min < self.logsnr_max:
            problems.append(f"logsnr_min {self.logsnr_min} must be below logsnr_max {self.logsnr_max}")
        if self.scale_min <= 0 or self.scale_max <= 0:
            problems.append(f"scale_min and scale_max must be positive, got {self.scale_min}, {self.scale_max}")
        if problems:
            raise ValueError("invalid log-SNR cosine schedule: " + "; ".join(problems))

    def sigmas_float64(self) -> np.ndarray:
        """Noise std sigma_t (num_timesteps,), increasing with t, read-only."""
        return _sigmas_float64(self)

    def alphas_float64(self) -> np.ndarray:
        """Signal scale alpha_t = sqrt(1 - sigma_t^2)."""
        return np.sqrt(1.0 - self.sigmas_float64() ** 2)

    def log_noise_to_signal(self) -> np.ndarray:
        """log(sigma_t / alpha_t) per timestep (+inf where alpha_t = 0)."""
        sigmas = self.sigmas_float64()
        with np.errstate(divide="ignore"):
            return 0.5 * np.log(sigmas**2 / (1.0 - sigmas**2))

    def diffuse(self, x0: Array, t: int, noise: Array) -> Array:
        """alpha_t x0 + sigma_t noise (modelscope's `diffuse`) at an integer timestep."""
        alpha, sigma = self.alphas_float64()[t], self.sigmas_float64()[t]
        return (jnp.float32(alpha) * x0.astype(jnp.float32) + jnp.float32(sigma) * noise.astype(jnp.float32)).astype(x0.dtype)


def _logsnr_cosine(n: int, logsnr_min: float, logsnr_max: float) -> np.ndarray:
    t_min = math.atan(math.exp(-0.5 * logsnr_min))
    t_max = math.atan(math.exp(-0.5 * logsnr_max))
    t = np.linspace(1.0, 0.0, n)
    return -2.0 * np.log(np.tan(t_min + t * (t_max - t_min)))


@functools.lru_cache(maxsize=8)
def _sigmas_float64(schedule: LogSNRCosineSchedule) -> np.ndarray:
    n = schedule.num_timesteps
    base = _logsnr_cosine(n, schedule.logsnr_min, schedule.logsnr_max)
    shifted_min = base + 2.0 * math.log(1.0 / schedule.scale_min)
    shifted_max = base + 2.0 * math.log(1.0 / schedule.scale_max)
    t = np.linspace(1.0, 0.0, n)
    logsnrs = t * shifted_min + (1.0 - t) * shifted_max
    sigmas = np.sqrt(1.0 / (1.0 + np.exp(logsnrs)))  # sqrt(sigmoid(-logsnr))
    if schedule.zero_terminal_snr and sigmas.max() != 1.0:
        low, high = sigmas.min(), sigmas.max()
        sigmas = low + (1.0 - low) / (high - low) * (sigmas - low)
    sigmas.flags.writeable = False
    return sigmas


# ----------------------------------------------------------------------------------- timesteps


def sampling_timesteps(num_steps: int, t_max: int, t_min: int, discretization: str) -> np.ndarray:
    """modelscope `sample`'s (fractional) timesteps, high to low, float32 as torch makes them."""
    if discretization not in DISCRETIZATIONS:
        raise ValueError(f"discretization={discretization!r} is not supported; expected one of {DISCRETIZATIONS}")
    if not 0 <= t_min < t_max:
        raise ValueError(f"need 0 <= t_min < t_max, got t_min={t_min}, t_max={t_max}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    span = t_max - t_min + 1
    # torch.arange sizes and fills in float64 (start + i * step), then stores float32.
    if discretization == "leading":
        steps = np.arange(t_min, t_max + 1, span / num_steps)[::-1]
    elif discretization == "linspace":
        steps = np.linspace(t_max, t_min, num_steps)
    else:
        steps = np.arange(t_max, t_min - 1, -(span / num_steps))
    return np.clip(steps.astype(np.float32), t_min, t_max)


def timesteps_to_levels(schedule: LogSNRCosineSchedule, t: np.ndarray) -> np.ndarray:
    """modelscope `_t_to_sigma`: noise-to-signal ratio at fractional timesteps, by linear
    interpolation of its logarithm between the neighbouring integer timesteps."""
    t = np.asarray(t, np.float64)
    low, high = np.floor(t).astype(np.int64), np.ceil(t).astype(np.int64)
    log_ratio = schedule.log_noise_to_signal()
    w = t - low
    with np.errstate(invalid="ignore"):
        log_level = (1 - w) * log_ratio[low] + w * log_ratio[high]
    return np.exp(np.where(np.isfinite(log_level), log_level, np.inf))


def levels_to_timesteps(schedule: LogSNRCosineSchedule, levels: np.ndarray) -> np.ndarray:
    """modelscope `_sigma_to_t(...).round().long()`: the integer timestep the model is given
    at each noise-to-signal ratio (the inverse interpolation, rounded half to even)."""
    log_ratio = schedule.log_noise_to_signal()
    log_level = np.log(np.asarray(levels, np.float64))
    dists = log_level[None, :] - log_ratio[:, None]
    low = np.minimum(np.argmax(np.cumsum(dists >= 0, axis=0), axis=0), len(log_ratio) - 2)
    lo, hi = log_ratio[low], log_ratio[low + 1]
    with np.errstate(invalid="ignore"):
        w = np.clip((lo - log_level) / (lo - hi), 0.0, 1.0)
    return np.round((1 - w) * low + w * (low + 1)).astype(np.int64)


# ------------------------------------------------------------------------------------- sampler


@struct.dataclass
class SDEPlan:
    """Per-step constants of a DPM-Solver++(2M) SDE run (eta = 1, midpoint), host-computed.

    Step i: the model sees x * input_scales[i] at timesteps[i]; x0 = signal_scales[i] * x_t -
    noise_scales[i] * v; then
        x <- sample_coeffs[i] x + x0_coeffs[i] x0 + x0_difference_coeffs[i] (x0 - x0_prev) + noise_coeffs[i] z
    (the difference term only once a previous x0 exists).
    """

    timesteps: Array  # (n,) int32
    input_scales: Array  # (n,) 1 / sqrt(s_i^2 + 1)
    signal_scales: Array  # (n,) alpha at timesteps[i]
    noise_scales: Array  # (n,) sigma at timesteps[i]
    sample_coeffs: Array
    x0_coeffs: Array
    x0_difference_coeffs: Array
    noise_coeffs: Array
    levels: Array  # (n + 1,) the noise-to-signal ratios s_i, last 0
    start_timestep: int = struct.field(pytree_node=False)
    start_scale: float = struct.field(pytree_node=False)  # s_0: the noised latents are multiplied by it

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


@struct.dataclass
class SDEState:
    step_index: Array  # () int32
    previous_x0: Array
    has_previous_x0: Array  # () bool


def dpmpp_2m_sde_plan(
    schedule: LogSNRCosineSchedule,
    num_steps: int = 30,
    t_max: int = 599,
    t_min: int = 0,
    discretization: str = "trailing",
) -> SDEPlan:
    """The steps of modelscope's `sample(solver='dpmpp_2m_sde', steps=num_steps, t_max=t_max,
    t_min=t_min, discretization=...)` (eta 1, midpoint, penultimate level discarded)."""
    if t_max > schedule.num_timesteps - 1:
        raise ValueError(f"t_max={t_max} is beyond the schedule's last timestep {schedule.num_timesteps - 1}")
    levels = timesteps_to_levels(schedule, sampling_timesteps(num_steps + 1, t_max, t_min, discretization))
    if not np.all(np.isfinite(levels)):
        raise ValueError(
            f"t_max={t_max} is pure noise under zero terminal SNR (infinite noise level); start at a lower timestep"
        )
    # Levels (float32 in modelscope), 0 appended, the penultimate one dropped.
    levels = np.concatenate([levels[:-1], [0.0]])
    timesteps = levels_to_timesteps(schedule, levels[:-1])
    current, following = levels[:-1], levels[1:]
    final = following == 0
    with np.errstate(divide="ignore"):
        h = np.log(current / following)  # +inf on the final step
    decay = np.exp(-2.0 * h)
    sample_coeffs = np.where(final, 0.0, following / current * np.exp(-h))
    x0_coeffs = np.where(final, 1.0, 1.0 - decay)
    noise_coeffs = np.where(final, 0.0, following * np.sqrt(1.0 - decay))
    previous_h = np.concatenate([[np.nan], h[:-1]])
    with np.errstate(invalid="ignore"):
        difference = 0.5 * (1.0 - decay) * h / previous_h
    x0_difference_coeffs = np.where(final | ~np.isfinite(difference), 0.0, difference)

    f32 = lambda a: jnp.asarray(a, jnp.float32)
    return SDEPlan(
        timesteps=jnp.asarray(timesteps, jnp.int32),
        input_scales=f32(1.0 / np.sqrt(current**2 + 1.0)),
        signal_scales=f32(schedule.alphas_float64()[timesteps]),
        noise_scales=f32(schedule.sigmas_float64()[timesteps]),
        sample_coeffs=f32(sample_coeffs),
        x0_coeffs=f32(x0_coeffs),
        x0_difference_coeffs=f32(x0_difference_coeffs),
        noise_coeffs=f32(noise_coeffs),
        levels=f32(levels),
        start_timestep=int(t_max),
        start_scale=float(levels[0]),
    )


def sde_initial_state(shape: tuple[int, ...]) -> SDEState:
    return SDEState(jnp.asarray(0, jnp.int32), jnp.zeros(shape, jnp.float32), jnp.asarray(False))


def sde_start(plan: SDEPlan, schedule: LogSNRCosineSchedule, latents: Array, noise: Array) -> Array:
    """The release's starting point: latents noised to t_max, times s_0 (see module doc)."""
    return plan.start_scale * schedule.diffuse(latents.astype(jnp.float32), plan.start_timestep, noise)


def v_to_x0(plan: SDEPlan, i: Array, model_input: Array, v: Array) -> Array:
    """x0 = alpha_t x_t - sigma_t v with the table values at step i's integer timestep."""
    return plan.signal_scales[i] * model_input.astype(jnp.float32) - plan.noise_scales[i] * v.astype(jnp.float32)


def dpmpp_2m_sde_step(plan: SDEPlan, state: SDEState, x0: Array, x: Array, noise: Array) -> tuple[Array, SDEState]:
    """One step from level s_i to s_{i+1} given the step's x0 prediction and standard-normal noise."""
    i = state.step_index
    difference = jnp.where(state.has_previous_x0, plan.x0_difference_coeffs[i], 0.0)
    x0 = x0.astype(jnp.float32)
    new = (
        plan.sample_coeffs[i] * x.astype(jnp.float32)
        + plan.x0_coeffs[i] * x0
        + difference * (x0 - state.previous_x0)
        + plan.noise_coeffs[i] * noise.astype(jnp.float32)
    )
    return new.astype(x.dtype), SDEState(i + 1, x0, jnp.asarray(True))


def guidance_with_rescale(conditional: Array, unconditional: Array, scale: float | Array, rescale: float | Array) -> Array:
    """modelscope `denoise`'s guidance: out = u + scale (c - u), then out *= rescale * std(c) /
    std(out) + (1 - rescale), the standard deviations (unbiased, as torch.std) taken over all
    but the leading batch axis."""
    out = unconditional + scale * (conditional - unconditional)
    axes = tuple(range(1, out.ndim))
    std = lambda a: jnp.std(a.astype(jnp.float32), axis=axes, keepdims=True, ddof=1)
    ratio = std(conditional) / (std(out) + 1e-12)
    return (out * (rescale * ratio + (1.0 - rescale))).astype(out.dtype)
