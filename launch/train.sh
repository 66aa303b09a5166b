#!/usr/bin/env bash
# `python -m st2v_jax.train ARGS` on every worker of a TPU VM (see launch/run_on_workers.sh).
# Paths are on the workers, relative to ~/st2v_jax. Only process 0 writes the logs and the
# exported model. On a pod slice, --workdir must be the same shared folder on every worker
# (an NFS/Filestore or gcsfuse mount): each host writes its shards of a checkpoint, and all
# hosts read them back to resume. Rerun the same command to resume after a preemption.
#
# Pass --distributed on a pod slice, so the hosts train one model together.
#
#   ZONE=us-west4-a launch/train.sh --config configs/train_streaming.py --workdir runs/cam_apm \
#       --config.model.init=ckpt/streaming_t2v --config.data.manual_dir=/data/webvid --distributed
#
# Environment: ZONE (required), TPU_NAME (default: st2v), PROJECT.

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

require_vars ZONE
require_arguments "$@"
exec "$(dirname "$0")/run_on_workers.sh" python -m st2v_jax.train "$@"
