"""`python -m st2v_jax.train --config configs/<file>.py --workdir DIR [--config.key=value ...]`

Trains (or, when DIR holds checkpoints, resumes) the run a config file describes; see
`st2v_jax/training/config.py` for every key. Overrides use ml_collections' syntax, e.g.
`--config.steps=2000 --config.data.manual_dir=/data/webvid`.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from absl import flags
from ml_collections import config_flags

from st2v_jax.cpu_kernels import prefer_eigen_kernels

USAGE = "usage: python -m st2v_jax.train --config configs/FILE.py --workdir DIR [--config.KEY=VALUE ...] [--until_step N] [--distributed]"


def main(argv: Optional[Sequence[str]] = None) -> int:
    prefer_eigen_kernels()
    argv = list(argv) if argv is not None else list(sys.argv)
    # Fresh flags per call: ml_collections finds the --config.KEY overrides in the argv it is given.
    flag_values = flags.FlagValues()
    config = config_flags.DEFINE_config_file(
        "config", None, "training config file (configs/*.py with get_config())", flag_values=flag_values, sys_argv=argv
    )
    workdir = flags.DEFINE_string("workdir", None, "run folder: checkpoints, logs, the exported model", flag_values=flag_values)
    until_step = flags.DEFINE_integer(
        "until_step", None, "stop with a checkpoint at this step (rerun to continue)", flag_values=flag_values
    )
    distributed = flags.DEFINE_bool(
        "distributed", False, "one run over several hosts (a TPU pod slice; elsewhere set JAX_COORDINATOR_ADDRESS, "
        "JAX_NUM_PROCESSES, JAX_PROCESS_ID): start this command on every host", flag_values=flag_values,
    )
    try:
        flag_values(argv)
    except flags.Error as err:
        print(f"{err}\n{USAGE}", file=sys.stderr)
        return 2
    if config.value is None or not workdir.value:
        print(USAGE, file=sys.stderr)
        return 2
    if distributed.value:
        from st2v_jax import multihost

        try:
            multihost.initialize()
        except multihost.DistributedSetupError as err:
            print(f"--distributed: {err}", file=sys.stderr)
            return 2
    from st2v_jax.compilation_cache import enable_compilation_cache
    from st2v_jax.training.trainer import train

    enable_compilation_cache()

    result = train(config.value, workdir.value, until_step.value)
    if result.model_dir is not None:
        print(f"done after {result.step} steps; model: {result.model_dir}")
    else:
        print(f"stopped at step {result.step}; rerun the same command to resume")
    return 0


if __name__ == "__main__":
    sys.exit(main())
