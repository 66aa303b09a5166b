"""Parity of st2v_jax.diffusion.schedules / solvers with diffusers' PyTorch schedulers.

Whole trajectories are run through both: the same fake model (a fixed function of the sample
plus a fixed per-step array) and the same per-step noise, diffusers step by step in torch
float32, ours inside one `jax.lax.scan`; every intermediate sample is compared.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from st2v_jax.diffusion.schedules import NoiseSchedule  # noqa: E402
from st2v_jax.diffusion.solvers import (  # noqa: E402
    ddim_step,
    ddim_timesteps,
    dpm_solver_init,
    dpm_solver_initial_state,
    dpm_solver_timesteps,
    dpm_step,
)

# ModelScope text-to-video-ms-1.7b scheduler/scheduler_config.json, the release's DDIM config. Written with
# diffusers 0.15, it has no timestep_spacing key (see test_missing_keys_take_the_defaults_of_the_class_loaded_into).
MODELSCOPE_CONFIG = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.15.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
# The refiner's form: v-prediction on a zero-terminal-SNR schedule with trailing timesteps.
ZERO_SNR_V_CONFIG = {
    **MODELSCOPE_CONFIG,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
}
SAMPLE_SHAPE = (2, 4, 3, 8, 8)  # (batch, channels, frames, height, width)
RELATIVE_TOLERANCE = 1e-5


def _fake_model_inputs(num_steps: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Initial sample, per-step model-output offsets and per-step noise, all float32."""
    rng = np.random.default_rng(seed)
    initial = rng.standard_normal(SAMPLE_SHAPE, dtype=np.float32)
    offsets = rng.standard_normal((num_steps, *SAMPLE_SHAPE), dtype=np.float32)
    noise = rng.standard_normal((num_steps, *SAMPLE_SHAPE), dtype=np.float32)
    return initial, offsets, noise


def _fake_model(sample, offset):
    """Depends on the sample, so a solver that feeds the wrong sample forward diverges."""
    return 0.5 * sample + 0.5 * offset


def _compare_trajectories(name: str, ours: np.ndarray, reference: np.ndarray) -> None:
    scale = max(1.0, float(np.abs(reference).max()))
    per_step = np.abs(ours - reference).reshape(len(reference), -1).max(axis=1)
    print(
        f"{name}: max |ours - diffusers| = {per_step.max():.3e} (step {per_step.argmax()}), "
        f"sample scale {scale:.3g}, relative {per_step.max() / scale:.3e}"
    )
    assert np.isfinite(ours).all()
    assert per_step.max() <= RELATIVE_TOLERANCE * scale


# ----------------------------------------------------------------------------------------------
# Schedules


@pytest.mark.parametrize("rescale_betas_zero_snr", [False, True])
@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_match_diffusers(beta_schedule, rescale_betas_zero_snr):
    config = {**MODELSCOPE_CONFIG, "beta_schedule": beta_schedule, "rescale_betas_zero_snr": rescale_betas_zero_snr}
    reference = diffusers.DDIMScheduler.from_config(config).alphas_cumprod.numpy()
    ours = np.asarray(NoiseSchedule.from_diffusers(config).alphas_cumprod())
    difference = np.abs(ours - reference).max()
    print(f"alphas_cumprod {beta_schedule} zero_snr={rescale_betas_zero_snr}: max abs diff {difference:.3e}")
    assert ours.dtype == np.float32
    assert difference <= 1e-6


@pytest.mark.parametrize("num_steps", [50, 25, 7])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_match_diffusers(spacing, num_steps):
    config = {**MODELSCOPE_CONFIG, "timestep_spacing": spacing}
    schedule = NoiseSchedule.from_diffusers(config)  # the spacing is explicit, so the same for both classes

    ddim = diffusers.DDIMScheduler.from_config(config)
    ddim.set_timesteps(num_steps)
    np.testing.assert_array_equal(schedule.timesteps(num_steps), ddim.timesteps.numpy())

    dpm = diffusers.DPMSolverMultistepScheduler.from_config(config)
    dpm.set_timesteps(num_steps)
    np.testing.assert_array_equal(dpm_solver_timesteps(schedule, num_steps), dpm.timesteps.numpy())
    np.testing.assert_array_equal(dpm_solver_init(schedule, num_steps).timesteps, dpm.timesteps.numpy())


def test_missing_keys_take_the_defaults_of_the_class_loaded_into():
    """The release builds its DPM-Solver with `DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)`
    from ModelScope's DDIM config, which has no timestep_spacing: DDIM spaces "leading", DPM "linspace"."""
    ddim = diffusers.DDIMScheduler.from_config(MODELSCOPE_CONFIG)
    dpm = diffusers.DPMSolverMultistepScheduler.from_config(ddim.config)
    for config in (MODELSCOPE_CONFIG, ddim.config):  # the json, and the loaded config with _use_default_values
        ddim_schedule = NoiseSchedule.from_diffusers(config, "DDIMScheduler")
        dpm_schedule = NoiseSchedule.from_diffusers(config, "DPMSolverMultistepScheduler")
        assert (ddim_schedule.timestep_spacing, dpm_schedule.timestep_spacing) == ("leading", "linspace")
        assert (ddim.config.timestep_spacing, dpm.config.timestep_spacing) == ("leading", "linspace")
    dpm.set_timesteps(50)
    np.testing.assert_array_equal(dpm_solver_timesteps(dpm_schedule, 50), dpm.timesteps.numpy())
    # DDIMScheduler clips x0 unless the config says not to: unsupported, so refused.
    with pytest.raises(ValueError, match="clip_sample=True"):
        NoiseSchedule.from_diffusers({"beta_schedule": "scaled_linear"}, "DDIMScheduler")


def test_from_diffusers_rejects_unsupported_values():
    with pytest.raises(ValueError, match="beta_schedule='sigmoid' is not supported"):
        NoiseSchedule.from_diffusers({**MODELSCOPE_CONFIG, "beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match="clip_sample=True"):
        NoiseSchedule.from_diffusers({**MODELSCOPE_CONFIG, "clip_sample": True})
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseSchedule.from_diffusers({**MODELSCOPE_CONFIG, "prediction_type": "flow_prediction"})


def test_add_noise_and_predictions_invert_each_other():
    schedule = NoiseSchedule.from_diffusers({**MODELSCOPE_CONFIG, "prediction_type": "v_prediction"})
    rng = np.random.default_rng(0)
    x0, noise = (jnp.asarray(rng.standard_normal(SAMPLE_SHAPE, dtype=np.float32)) for _ in range(2))
    t = jnp.array([10, 700])  # one timestep per batch entry
    noisy = schedule.add_noise(x0, noise, t)
    reference = diffusers.DDIMScheduler.from_config(MODELSCOPE_CONFIG).add_noise(
        torch.from_numpy(np.array(x0)), torch.from_numpy(np.array(noise)), torch.from_numpy(np.array(t))
    )
    np.testing.assert_allclose(noisy, reference.numpy(), atol=1e-6)

    alpha_bar = schedule.alphas_cumprod()[t][:, None, None, None, None]
    velocity = jnp.sqrt(alpha_bar) * noise - jnp.sqrt(1.0 - alpha_bar) * x0
    x0_predicted, eps_predicted = schedule.predict_x0_and_eps(velocity, noisy, t)
    np.testing.assert_allclose(x0_predicted, x0, atol=1e-5)
    np.testing.assert_allclose(eps_predicted, noise, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# DDIM


def _run_ddim_pair(config: dict, eta: float, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    initial, offsets, noise = _fake_model_inputs(num_steps, seed=1)

    scheduler = diffusers.DDIMScheduler.from_config(config)
    scheduler.set_timesteps(num_steps)
    sample, reference = torch.from_numpy(initial), []
    for i, t in enumerate(scheduler.timesteps):
        model_output = _fake_model(sample, torch.from_numpy(offsets[i]))
        sample = scheduler.step(model_output, t, sample, eta=eta, variance_noise=torch.from_numpy(noise[i])).prev_sample
        reference.append(sample.numpy())

    schedule = NoiseSchedule.from_diffusers(config)
    timesteps, previous_timesteps = ddim_timesteps(schedule, num_steps)

    def one_step(sample, per_step):
        t, prev_t, offset, step_noise = per_step
        sample = ddim_step(schedule, _fake_model(sample, offset), t, prev_t, sample, eta, step_noise)
        return sample, sample

    _, ours = jax.jit(lambda x, xs: jax.lax.scan(one_step, x, xs))(
        jnp.asarray(initial), (jnp.asarray(timesteps), jnp.asarray(previous_timesteps), offsets, noise)
    )
    return np.asarray(ours), np.stack(reference)


@pytest.mark.parametrize("num_steps", [50, 7])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_trajectory_matches_diffusers(eta, spacing, num_steps):
    ours, reference = _run_ddim_pair({**MODELSCOPE_CONFIG, "timestep_spacing": spacing}, eta, num_steps)
    _compare_trajectories(f"DDIM eta={eta} {spacing} {num_steps} steps", ours, reference)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_ddim_other_predictions_and_final_alpha_one_match_diffusers(prediction_type):
    config = {**MODELSCOPE_CONFIG, "prediction_type": prediction_type, "set_alpha_to_one": True}
    ours, reference = _run_ddim_pair(config, 1.0, 7)
    _compare_trajectories(f"DDIM eta=1 {prediction_type} set_alpha_to_one 7 steps", ours, reference)


# ----------------------------------------------------------------------------------------------
# DPM-Solver++


DPM_CASES = {
    "2M epsilon": (MODELSCOPE_CONFIG, "dpmsolver++"),
    "2M SDE v zero-SNR trailing": (ZERO_SNR_V_CONFIG, "sde-dpmsolver++"),
}


def _run_dpm_pair(config, algorithm_type, num_steps, begin_index=0, **solver_options):
    initial, offsets, noise = _fake_model_inputs(num_steps, seed=2)

    scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
        config, algorithm_type=algorithm_type, **solver_options
    )
    scheduler.set_timesteps(num_steps)
    scheduler.set_begin_index(begin_index)
    sample, reference = torch.from_numpy(initial), []
    for i in range(begin_index, num_steps):
        model_output = _fake_model(sample, torch.from_numpy(offsets[i]))
        t = scheduler.timesteps[i]
        sample = scheduler.step(model_output, t, sample, variance_noise=torch.from_numpy(noise[i])).prev_sample
        reference.append(sample.numpy())

    schedule = NoiseSchedule.from_diffusers(config, "DPMSolverMultistepScheduler")
    dpm = dpm_solver_init(schedule, num_steps, algorithm_type=algorithm_type, **solver_options)

    def one_step(carry, per_step):
        sample, state = carry
        offset, step_noise = per_step
        sample, state = dpm_step(dpm, state, _fake_model(sample, offset), sample, step_noise)
        return (sample, state), sample

    state = dpm_solver_initial_state(SAMPLE_SHAPE, begin_index)
    _, ours = jax.jit(lambda carry, xs: jax.lax.scan(one_step, carry, xs))(
        (jnp.asarray(initial), state), (offsets[begin_index:], noise[begin_index:])
    )
    return np.asarray(ours), np.stack(reference)


@pytest.mark.parametrize("num_steps", [50, 7])
@pytest.mark.parametrize("case", list(DPM_CASES))
def test_dpm_solver_trajectory_matches_diffusers(case, num_steps):
    config, algorithm_type = DPM_CASES[case]
    ours, reference = _run_dpm_pair(config, algorithm_type, num_steps)
    _compare_trajectories(f"DPM++ {case} {num_steps} steps", ours, reference)


@pytest.mark.parametrize(
    "solver_options",
    [
        {"solver_order": 1},
        {"final_sigmas_type": "sigma_min"},
        {"final_sigmas_type": "sigma_min", "euler_at_final": True},
    ],
)
def test_dpm_solver_options_match_diffusers(solver_options):
    config, algorithm_type = DPM_CASES["2M SDE v zero-SNR trailing"]
    ours, reference = _run_dpm_pair(config, algorithm_type, 20, **solver_options)
    _compare_trajectories(f"DPM++ SDE {solver_options} 20 steps", ours, reference)


def test_dpm_solver_started_part_way_matches_diffusers():
    """img2img-style start (diffusers' set_begin_index): the first step taken is first order."""
    config, algorithm_type = DPM_CASES["2M epsilon"]
    ours, reference = _run_dpm_pair(config, algorithm_type, 50, begin_index=20)
    _compare_trajectories("DPM++ 2M epsilon 50 steps from step 20", ours, reference)


def test_dpm_step_requires_noise_for_sde():
    dpm = dpm_solver_init(NoiseSchedule.from_diffusers(ZERO_SNR_V_CONFIG), 10, algorithm_type="sde-dpmsolver++")
    sample = jnp.zeros(SAMPLE_SHAPE)
    with pytest.raises(ValueError, match="needs `noise`"):
        dpm_step(dpm, dpm_solver_initial_state(SAMPLE_SHAPE), sample, sample)
