"""XLA:CPU kernel choice for the command-line tools.

jax 0.10's XLA:CPU hands dots (with the LayerNorms and transposes around them) to YNNPACK
fusions by default. On the StreamingT2V UNets these run slower than XLA's own Eigen GEMMs:
the medium UNet3D forward of `python -m st2v_jax.benchmarks` takes 7.1-9.1 s with them and
6.9 s without (2-core Sapphire Rapids, fp32). The flag only concerns the CPU backend, so TPU
and GPU runs are unchanged.
"""
from __future__ import annotations

import os

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def prefer_eigen_kernels() -> None:
    """Turns XLA:CPU's YNNPACK fusions off, unless $XLA_FLAGS already sets that option (the
    user's choice stands). It must run before JAX starts its CPU client, which reads
    $XLA_FLAGS once: at the top of a command's entry point."""
    flags = os.environ.get("XLA_FLAGS", "")
    if YNN_FUSION_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {YNN_FUSION_FLAG}=".strip()
