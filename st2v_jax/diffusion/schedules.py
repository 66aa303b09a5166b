"""Discrete-time noise schedules (betas, alphas_cumprod, inference timesteps) as plain values.

`NoiseSchedule` is a frozen, hashable description of a diffusers scheduler's schedule part
(what `DDIMScheduler.__init__` / `DPMSolverMultistepScheduler.__init__` build from
`scheduler_config.json`). The arrays are computed on the host in float64, in the same order
of operations as diffusers (which computes them in torch float32), and handed to JAX as float32.

Notation: `alphas_cumprod[t]` is diffusers' alpha-bar_t, so a noisy sample is
    x_t = sqrt(alphas_cumprod[t]) * x_0 + sqrt(1 - alphas_cumprod[t]) * eps.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# diffusers config keys that switch on behaviour this module does not reproduce, with the value
# that means "off". `from_diffusers` refuses a config that turns any of them on rather than
# silently sampling differently from the reference.
_UNSUPPORTED_WHEN_SET = {
    "trained_betas": None,
    "clip_sample": False,
    "thresholding": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "use_dynamic_shifting": False,
    "variance_type": None,
    "lambda_min_clipped": -math.inf,
}

# Constructor defaults of the diffusers scheduler classes where they differ from NoiseSchedule's
# (which are DDIMScheduler's) or switch on something unsupported (DDIM clips x0 unless told not to).
_DIFFUSERS_CLASS_DEFAULTS = {
    "DDIMScheduler": {"clip_sample": True},
    "DPMSolverMultistepScheduler": {"timestep_spacing": "linspace"},
}


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """The noise schedule of a diffusers scheduler config. Defaults are `DDIMScheduler`'s.

    Hashable, so it can be closed over or passed as a static argument to `jax.jit`.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    rescale_betas_zero_snr: bool = False
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    # DDIM only: alpha-bar "before" timestep 0 is 1 (True) or alphas_cumprod[0] (False).
    set_alpha_to_one: bool = True

    def __post_init__(self):
        for name, allowed in (
            ("beta_schedule", BETA_SCHEDULES),
            ("prediction_type", PREDICTION_TYPES),
            ("timestep_spacing", TIMESTEP_SPACINGS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not supported; expected one of {allowed}")

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], scheduler_class: str = "DDIMScheduler") -> NoiseSchedule:
        """The schedule of `<scheduler_class>.from_config(config)` for a diffusers scheduler config
        dict (`scheduler_config.json`, or a scheduler's `.config`).

        As in diffusers, a key missing from `config` (or listed in its `_use_default_values`) takes
        the default of the class it is loaded into. That matters: ModelScope's config has no
        `timestep_spacing`, so `DDIMScheduler` spaces "leading" but
        `DPMSolverMultistepScheduler.from_config(the same config)` spaces "linspace".
        Keys that are not part of the schedule (solver options, `_class_name`) are ignored.
        Raises ValueError for values this module does not implement.
        """
        if scheduler_class not in _DIFFUSERS_CLASS_DEFAULTS:
            supported = tuple(_DIFFUSERS_CLASS_DEFAULTS)
            raise ValueError(f"scheduler_class={scheduler_class!r} is not supported; expected one of {supported}")
        used_defaults = set(config.get("_use_default_values", ()))
        config = {
            **_DIFFUSERS_CLASS_DEFAULTS[scheduler_class],
            **{key: value for key, value in config.items() if key not in used_defaults},
        }
        for key, off_value in _UNSUPPORTED_WHEN_SET.items():
            if key in config and config[key] != off_value:
                raise ValueError(
                    f"scheduler config sets {key}={config[key]!r}; only {key}={off_value!r} is supported"
                )
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in config.items() if key in fields})

    def alphas_cumprod_float64(self) -> np.ndarray:
        """diffusers' `self.alphas_cumprod` (cumprod of 1 - betas), in float64, read-only."""
        return _alphas_cumprod_float64(self)

    def alphas_cumprod(self) -> Array:
        """`alphas_cumprod_float64()` as a float32 JAX array of shape (num_train_timesteps,)."""
        return jnp.asarray(self.alphas_cumprod_float64(), jnp.float32)

    def timesteps(self, num_inference_steps: int) -> np.ndarray:
        """Inference timesteps, high to low, exactly as `DDIMScheduler.set_timesteps` makes them.

        (DPM-Solver multistep spaces "leading" and "linspace" differently; see
        `st2v_jax.diffusion.solvers.dpm_solver_timesteps`.)
        """
        n_train = self.num_train_timesteps
        if not 0 < num_inference_steps <= n_train:
            raise ValueError(f"num_inference_steps must be in [1, {n_train}], got {num_inference_steps}")
        if self.timestep_spacing == "linspace":
            return np.linspace(0, n_train - 1, num_inference_steps).round()[::-1].astype(np.int64)
        if self.timestep_spacing == "leading":
            step_ratio = n_train // num_inference_steps
            return (np.arange(num_inference_steps) * step_ratio)[::-1].astype(np.int64) + self.steps_offset
        # "trailing": counts down from the last training timestep, ignoring steps_offset.
        step_ratio = n_train / num_inference_steps
        return np.round(np.arange(n_train, 0, -step_ratio)).astype(np.int64) - 1

    def add_noise(self, x0: Array, noise: Array, t: Array | int) -> Array:
        """Forward diffusion q(x_t | x_0), as diffusers' `DDIMScheduler.add_noise`.

        `t` is a scalar or one timestep per leading (batch) entry of `x0`.
        """
        alpha_bar = _broadcast_to_rank(self.alphas_cumprod()[jnp.asarray(t)], x0.ndim)
        return jnp.sqrt(alpha_bar) * x0 + jnp.sqrt(1.0 - alpha_bar) * noise

    def predict_x0_and_eps(self, model_output: Array, sample: Array, t: Array | int) -> tuple[Array, Array]:
        """(predicted x_0, predicted eps) from the model output at timestep `t`, for this
        schedule's prediction_type; the formulas of `DDIMScheduler.step`, step 3."""
        alpha_bar = _broadcast_to_rank(self.alphas_cumprod()[jnp.asarray(t)], sample.ndim)
        return prediction_to_x0_and_eps(
            self.prediction_type, model_output, sample, jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar)
        )


def prediction_to_x0_and_eps(
    prediction_type: str, model_output: Array, sample: Array, signal_scale: Array, noise_scale: Array
) -> tuple[Array, Array]:
    """(x_0, eps) implied by a model output for x_t = signal_scale * x_0 + noise_scale * eps.

    signal_scale / noise_scale are sqrt(alpha-bar_t) / sqrt(1 - alpha-bar_t) (diffusers'
    alpha_t / sigma_t in the DPM solvers).
    """
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - noise_scale * eps) / signal_scale
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - signal_scale * x0) / noise_scale
    elif prediction_type == "v_prediction":
        x0 = signal_scale * sample - noise_scale * model_output
        eps = signal_scale * model_output + noise_scale * sample
    else:
        raise ValueError(f"prediction_type={prediction_type!r} is not supported; expected one of {PREDICTION_TYPES}")
    return x0, eps


def _broadcast_to_rank(per_batch: Array, ndim: int) -> Array:
    """Scalar stays scalar; shape (B,) becomes (B, 1, ..., 1) to multiply a rank-`ndim` array."""
    return per_batch.reshape(per_batch.shape + (1,) * (ndim - per_batch.ndim)) if per_batch.ndim else per_batch


def _glide_cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """diffusers' `betas_for_alpha_bar` with the "cosine" transform (beta_schedule "squaredcos_cap_v2")."""

    def alpha_bar(t: np.ndarray) -> np.ndarray:
        return np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2

    t = np.arange(num_train_timesteps, dtype=np.float64) / num_train_timesteps
    t_next = np.arange(1, num_train_timesteps + 1, dtype=np.float64) / num_train_timesteps
    return np.minimum(1.0 - alpha_bar(t_next) / alpha_bar(t), max_beta)


def _rescale_to_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """diffusers' `rescale_zero_terminal_snr` (Lin et al. 2023, Algorithm 1): shift and scale
    sqrt(alpha-bar) so the last timestep is pure noise and the first is unchanged."""
    sqrt_alpha_bar = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_alpha_bar[0], sqrt_alpha_bar[-1]
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * (first / (first - last))
    alpha_bar = sqrt_alpha_bar**2
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


def _betas_float64(schedule: NoiseSchedule) -> np.ndarray:
    n = schedule.num_train_timesteps
    if schedule.beta_schedule == "linear":
        betas = np.linspace(schedule.beta_start, schedule.beta_end, n)
    elif schedule.beta_schedule == "scaled_linear":
        # Linear in sqrt(beta): the latent-diffusion (and ModelScope T2V) schedule.
        betas = np.linspace(schedule.beta_start**0.5, schedule.beta_end**0.5, n) ** 2
    else:
        betas = _glide_cosine_betas(n)
    if schedule.rescale_betas_zero_snr:
        betas = _rescale_to_zero_terminal_snr(betas)
    return betas


@functools.lru_cache(maxsize=32)
def _alphas_cumprod_float64(schedule: NoiseSchedule) -> np.ndarray:
    alphas_cumprod = np.cumprod(1.0 - _betas_float64(schedule))
    alphas_cumprod.flags.writeable = False  # cached and shared between callers
    return alphas_cumprod
