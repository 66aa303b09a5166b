#!/usr/bin/env bash
# `python -m st2v_jax.convert ARGS` on every worker of a TPU VM (see launch/run_on_workers.sh):
# every worker loads --model-dir from its own disk, so each converts its own copy; the source
# files must be at the same path on every worker. Paths are relative to ~/st2v_jax.
#
#   ZONE=us-west4-a launch/convert.sh official --checkpoint weights/streaming_t2v.ckpt \
#       --base-model-dir weights/text-to-video-ms-1.7b --out ckpt/streaming_t2v
#
# Environment: ZONE (required), TPU_NAME (default: st2v), PROJECT.

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

require_vars ZONE
require_arguments "$@"
# On the CPU: converting is host work, and this way it neither waits for the other hosts of
# a slice nor collides with a job that holds the TPU.
exec "$(dirname "$0")/run_on_workers.sh" env JAX_PLATFORMS=cpu python -m st2v_jax.convert "$@"
