"""Diffusion sampling steps as pure functions: DDIM and multistep DPM-Solver++ (ODE and SDE).

Each step reproduces one `step()` call of the corresponding diffusers scheduler; the mutable
scheduler state (step counter, model-output history) is an explicit pytree instead, and random
noise is an argument, so a whole sampling loop can run inside `jax.lax.scan` / `fori_loop`.

DDIM (streaming stage of the release: 50 steps, eta = 1):

    timesteps, previous_timesteps = ddim_timesteps(schedule, 50)
    x = ddim_step(schedule, eps, timesteps[i], previous_timesteps[i], x, eta=1.0, noise=z_i)

DPM-Solver++ (initialisation chunk: "dpmsolver++", order 2; refiner: "sde-dpmsolver++"):

    dpm = dpm_solver_init(schedule, 50)
    state = dpm_solver_initial_state(x.shape)
    x, state = dpm_step(dpm, state, model(x, dpm.timesteps[state.step_index]), x)
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from st2v_jax.diffusion.schedules import NoiseSchedule, prediction_to_x0_and_eps

Array = jax.Array

DPM_ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


# ----------------------------------------------------------------------------------------------
# DDIM


def ddim_timesteps(schedule: NoiseSchedule, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, previous_timesteps) for `ddim_step`, both int arrays of length num_inference_steps.

    timesteps are `DDIMScheduler.set_timesteps`'. previous_timesteps are what `DDIMScheduler.step`
    computes, t - num_train_timesteps // num_inference_steps: negative on the last "leading" step
    (-> the final alpha-bar), and not always the next timestep for "trailing"/"linspace" spacing.
    """
    timesteps = schedule.timesteps(num_inference_steps)
    return timesteps, timesteps - schedule.num_train_timesteps // num_inference_steps


def ddim_step(
    schedule: NoiseSchedule,
    model_output: Array,
    t: Array | int,
    prev_t: Array | int,
    sample: Array,
    eta: Array | float = 0.0,
    noise: Optional[Array] = None,
) -> Array:
    """x_t -> x_prev_t, as `DDIMScheduler.step(model_output, t, sample, eta, variance_noise=noise)`
    with clip_sample=False, thresholding=False, use_clipped_model_output=False.

    `noise` (standard normal, shape of `sample`) is required when eta > 0; eta = 0 is
    deterministic DDIM, eta = 1 has DDPM's posterior variance. `t` / `prev_t` may be traced (eta
    too, but then `noise` is required). Computes in float32 and returns sample's dtype, so the
    sample can be a `lax.scan` carry.
    """
    if noise is None and not (isinstance(eta, (int, float)) and eta == 0):
        raise ValueError("ddim_step needs `noise` when eta may be non-zero")
    alphas_cumprod = schedule.alphas_cumprod()
    alpha_bar = alphas_cumprod[t]
    # Before timestep 0 there is no alpha-bar: diffusers' final_alpha_cumprod.
    final_alpha_bar = 1.0 if schedule.set_alpha_to_one else alphas_cumprod[0]
    alpha_bar_prev = jnp.where(prev_t >= 0, alphas_cumprod[jnp.maximum(prev_t, 0)], final_alpha_bar)

    x0, eps = prediction_to_x0_and_eps(
        schedule.prediction_type,
        model_output.astype(jnp.float32),
        sample.astype(jnp.float32),
        jnp.sqrt(alpha_bar),
        jnp.sqrt(1.0 - alpha_bar),
    )
    # DDIM paper eq. (16): sigma_t(eta)^2 = eta^2 (1 - a_prev)/(1 - a_t) (1 - a_t/a_prev).
    variance = (1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * (1.0 - alpha_bar / alpha_bar_prev)
    std = eta * jnp.sqrt(variance)
    # Mathematically >= 0; the clamp only turns a rounding-negative value (NaN in diffusers) into 0.
    direction_scale = jnp.sqrt(jnp.maximum(1.0 - alpha_bar_prev - std**2, 0.0))
    prev_sample = jnp.sqrt(alpha_bar_prev) * x0 + direction_scale * eps
    if noise is not None:
        prev_sample = prev_sample + std * noise.astype(jnp.float32)
    return prev_sample.astype(sample.dtype)


# ----------------------------------------------------------------------------------------------
# DPM-Solver++ multistep


def dpm_solver_timesteps(schedule: NoiseSchedule, num_inference_steps: int) -> np.ndarray:
    """Inference timesteps, high to low, as `DPMSolverMultistepScheduler.set_timesteps` makes them
    (lambda_min_clipped = -inf). Unlike DDIM, "linspace" and "leading" split the range into
    num_inference_steps + 1 intervals and drop timestep 0."""
    n_train = schedule.num_train_timesteps
    if not 0 < num_inference_steps <= n_train:
        raise ValueError(f"num_inference_steps must be in [1, {n_train}], got {num_inference_steps}")
    if schedule.timestep_spacing == "linspace":
        return np.linspace(0, n_train - 1, num_inference_steps + 1).round()[::-1][:-1].astype(np.int64)
    if schedule.timestep_spacing == "leading":
        step_ratio = n_train // (num_inference_steps + 1)
        return (np.arange(num_inference_steps + 1) * step_ratio)[::-1][:-1].astype(np.int64) + schedule.steps_offset
    step_ratio = n_train / num_inference_steps
    return np.arange(n_train, 0, -step_ratio).round().astype(np.int64) - 1


@struct.dataclass
class DPMSolverSchedule:
    """Per-step constants of a DPM-Solver++ run, precomputed on the host by `dpm_solver_init`.

    Step i maps x at timesteps[i] to x at the next timestep (or to sigma = 0 / sigma_min after the
    last) as
        x_next = sample_coeffs[i] * x + x0_coeffs[i] * x0_i
                 + [second order] x0_difference_coeffs[i] * (x0_i - x0_{i-1})
                 + [SDE] noise_coeffs[i] * z
    which is diffusers' first-order update plus, for the midpoint second-order update, its
    0.5 * (...) * D1 term with D1 = (x0_i - x0_{i-1}) / r0 folded into one coefficient.
    """

    timesteps: Array  # (n,) int32: the timestep to give the model at step i
    signal_scales: Array  # (n,) sqrt(alpha-bar) at step i (diffusers' alpha_t), for x0 from the output
    noise_scales: Array  # (n,) sqrt(1 - alpha-bar) at step i (diffusers' sigma_t)
    sample_coeffs: Array  # (n,)
    x0_coeffs: Array  # (n,)
    # (n,) zero on steps diffusers always takes first order (solver_order 1, the final step, ...);
    # on other steps it is used only once a previous x0 exists (diffusers' lower_order_nums >= 1).
    x0_difference_coeffs: Array
    noise_coeffs: Array  # (n,) zero for the ODE solver
    prediction_type: str = struct.field(pytree_node=False)
    stochastic: bool = struct.field(pytree_node=False)  # "sde-dpmsolver++": dpm_step needs noise


@struct.dataclass
class DPMSolverState:
    """What `DPMSolverMultistepScheduler` keeps between `step()` calls, as arrays."""

    step_index: Array  # () int32: index into the DPMSolverSchedule arrays
    previous_x0: Array  # x0 prediction of the previous step, float32 (diffusers' model_outputs[-2])
    has_previous_x0: Array  # () bool: diffusers' lower_order_nums >= 1


def dpm_solver_init(
    schedule: NoiseSchedule,
    num_inference_steps: int,
    *,
    algorithm_type: str = "dpmsolver++",
    solver_order: int = 2,
    lower_order_final: bool = True,
    euler_at_final: bool = False,
    final_sigmas_type: str = "zero",
) -> DPMSolverSchedule:
    """Precomputes the steps of `DPMSolverMultistepScheduler(**schedule, algorithm_type=...,
    solver_order=..., solver_type="midpoint", ...)` after `set_timesteps(num_inference_steps)`.

    Supported: the "dpmsolver++" (ODE) and "sde-dpmsolver++" algorithms, orders 1 and 2, the
    default sigma spacing (no Karras / exponential / beta / Lu sigmas), no thresholding.
    """
    if algorithm_type not in DPM_ALGORITHM_TYPES:
        raise ValueError(f"algorithm_type={algorithm_type!r} is not supported; expected one of {DPM_ALGORITHM_TYPES}")
    if solver_order not in (1, 2):
        raise ValueError(f"solver_order={solver_order} is not supported; expected 1 or 2")
    if final_sigmas_type not in FINAL_SIGMAS_TYPES:
        raise ValueError(
            f"final_sigmas_type={final_sigmas_type!r} is not supported; expected one of {FINAL_SIGMAS_TYPES}"
        )
    stochastic = algorithm_type == "sde-dpmsolver++"
    timesteps = dpm_solver_timesteps(schedule, num_inference_steps)

    alphas_cumprod = np.array(schedule.alphas_cumprod_float64())
    if schedule.rescale_betas_zero_snr:
        # diffusers keeps the terminal alpha-bar off exactly 0 so that its sigma (and lambda) are finite.
        alphas_cumprod[-1] = 2.0**-24
    # diffusers' `sigmas`: the noise-to-signal ratio sqrt((1 - alpha-bar) / alpha-bar), per step,
    # then the value after the last step.
    noise_to_signal = np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)
    final_noise_to_signal = 0.0 if final_sigmas_type == "zero" else noise_to_signal[0]
    noise_to_signal = np.append(noise_to_signal[timesteps], final_noise_to_signal)
    signal_scales = 1.0 / np.sqrt(noise_to_signal**2 + 1.0)
    noise_scales = noise_to_signal * signal_scales
    with np.errstate(divide="ignore"):  # lambda = +inf after the last step when its sigma is zero
        log_snr = np.log(signal_scales) - np.log(noise_scales)  # diffusers' lambda_t
    step_sizes = np.diff(log_snr)  # h: (n,), h[-1] = +inf for final sigma zero

    # DPM-Solver++ (data prediction) first-order update, from noise scale s to t with h = lambda_t - lambda_s:
    #   ODE: x_t = (sigma_t / sigma_s) x + alpha_t (1 - e^-h) x0
    #   SDE: x_t = (sigma_t / sigma_s) e^-h x + alpha_t (1 - e^-2h) x0 + sigma_t sqrt(1 - e^-2h) z
    noise_scale_ratios = noise_scales[1:] / noise_scales[:-1]
    if stochastic:
        decay = np.exp(-2.0 * step_sizes)
        sample_coeffs = noise_scale_ratios * np.exp(-step_sizes)
        noise_coeffs = noise_scales[1:] * np.sqrt(1.0 - decay)
    else:
        decay = np.exp(-step_sizes)
        sample_coeffs = noise_scale_ratios
        noise_coeffs = np.zeros(num_inference_steps)
    x0_coeffs = signal_scales[1:] * (1.0 - decay)

    # Midpoint second order: + 0.5 * x0_coeff * D1, D1 = (x0_i - x0_{i-1}) / r0, r0 = h_{i-1} / h_i.
    # (Step 0 never has a previous x0; a zero-sigma final step gets +inf here, zeroed just below.)
    x0_difference_coeffs = np.concatenate([[0.0], 0.5 * x0_coeffs[1:] * step_sizes[1:] / step_sizes[:-1]])
    # diffusers' lower_order_final: the last step is first order when euler_at_final, when the final
    # sigma is zero, or for short (< 15 step) runs with lower_order_final.
    last_step_first_order = (
        euler_at_final or final_sigmas_type == "zero" or (lower_order_final and num_inference_steps < 15)
    )
    if solver_order == 1:
        x0_difference_coeffs[:] = 0.0
    elif last_step_first_order:
        x0_difference_coeffs[-1] = 0.0

    def as_f32(x: np.ndarray) -> Array:
        return jnp.asarray(x, jnp.float32)

    return DPMSolverSchedule(
        timesteps=jnp.asarray(timesteps, jnp.int32),
        signal_scales=as_f32(signal_scales[:-1]),
        noise_scales=as_f32(noise_scales[:-1]),
        sample_coeffs=as_f32(sample_coeffs),
        x0_coeffs=as_f32(x0_coeffs),
        x0_difference_coeffs=as_f32(x0_difference_coeffs),
        noise_coeffs=as_f32(noise_coeffs),
        prediction_type=schedule.prediction_type,
        stochastic=stochastic,
    )


def dpm_solver_initial_state(sample_shape: tuple[int, ...], begin_index: int | Array = 0) -> DPMSolverState:
    """State before the first `dpm_step`. `begin_index` > 0 starts part-way through the schedule
    (diffusers' `set_begin_index`, e.g. for img2img); the first step taken is first order either way."""
    return DPMSolverState(
        step_index=jnp.asarray(begin_index, jnp.int32),
        previous_x0=jnp.zeros(sample_shape, jnp.float32),
        has_previous_x0=jnp.asarray(False),
    )


def dpm_step(
    dpm: DPMSolverSchedule,
    state: DPMSolverState,
    model_output: Array,
    sample: Array,
    noise: Optional[Array] = None,
) -> tuple[Array, DPMSolverState]:
    """One `DPMSolverMultistepScheduler.step(model_output, t, sample, variance_noise=noise)` at
    t = dpm.timesteps[state.step_index]. Returns (prev_sample, next state).

    Computes in float32 (as diffusers does) and returns prev_sample in sample's dtype, so the
    sample can be a `lax.scan` carry. `noise` (standard normal, shape of `sample`) is required for
    "sde-dpmsolver++" and ignored by "dpmsolver++".
    """
    if dpm.stochastic and noise is None:
        raise ValueError("sde-dpmsolver++ needs `noise` for every step")
    i = state.step_index
    sample32 = sample.astype(jnp.float32)
    x0, _ = prediction_to_x0_and_eps(
        dpm.prediction_type, model_output.astype(jnp.float32), sample32, dpm.signal_scales[i], dpm.noise_scales[i]
    )
    # Without a previous x0 (first step taken) the multistep update falls back to first order.
    x0_difference_coeff = jnp.where(state.has_previous_x0, dpm.x0_difference_coeffs[i], 0.0)
    prev_sample = (
        dpm.sample_coeffs[i] * sample32 + dpm.x0_coeffs[i] * x0 + x0_difference_coeff * (x0 - state.previous_x0)
    )
    if dpm.stochastic:
        prev_sample = prev_sample + dpm.noise_coeffs[i] * noise.astype(jnp.float32)
    next_state = DPMSolverState(step_index=i + 1, previous_x0=x0, has_previous_x0=jnp.asarray(True))
    return prev_sample.astype(sample.dtype), next_state
