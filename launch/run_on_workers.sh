#!/usr/bin/env bash
# Runs a command on every worker of a TPU VM at the same time, from the checkout and in the
# virtualenv that launch/install.sh made (relative paths are relative to ~/st2v_jax on the
# workers). The workers' output is interleaved.
#
#   ZONE=us-west4-a launch/run_on_workers.sh python -m st2v_jax.sample --prompt "a cat surfing" --out cat.mp4
#
# Environment:
#   ZONE       (required) the TPU VM's zone
#   TPU_NAME   the TPU VM (default: st2v)
#   PROJECT    Google Cloud project (default: gcloud's configured project)

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

require_vars ZONE
require_arguments "$@"

run_in_checkout() {
  set -e
  cd "$HOME/$WORKER_CHECKOUT"
  # shellcheck source=/dev/null  # made by install.sh on the worker
  source "$HOME/$WORKER_VENV/bin/activate"
  exec "$@"
}

on_all_workers run_in_checkout "$@"
