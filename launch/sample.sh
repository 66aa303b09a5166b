#!/usr/bin/env bash
# `python -m st2v_jax.sample ARGS` on every worker of a TPU VM (see launch/run_on_workers.sh;
# `launch/sample.sh --help` lists the options). Paths are on the workers, relative to
# ~/st2v_jax. With --distributed (needed on a pod slice, where one run spans the hosts)
# worker 0 writes the video; the others keep their copies under ~/.cache/st2v_jax.
#
#   ZONE=us-west4-a launch/sample.sh --model-dir ckpt/streaming_t2v --prompt "a cat surfing a wave" \
#       --num-frames 240 --mesh data=-1,fsdp=4 --distributed --out cat.mp4
#
# Environment: ZONE (required), TPU_NAME (default: st2v), PROJECT.

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

require_vars ZONE
require_arguments "$@"
exec "$(dirname "$0")/run_on_workers.sh" python -m st2v_jax.sample "$@"
