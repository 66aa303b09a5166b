#!/usr/bin/env bash
# Installs st2v_jax and jax[tpu] on every worker of a TPU VM (rerun it to move to another REF):
# ~/st2v_jax is a checkout of REF, ~/st2v_venv a Python 3.12 virtualenv with st2v_jax
# (editable, from that checkout) and jax[tpu].
#
#   ZONE=us-west4-a launch/install.sh
#   ZONE=us-west4-a REF=my-branch launch/install.sh
#
# Environment:
#   ZONE       (required) the TPU VM's zone
#   TPU_NAME   the TPU VM (default: st2v)
#   PROJECT    Google Cloud project (default: gcloud's configured project)
#   REPO_URL   git repository of st2v_jax (default: https://github.com/st2v-jax/st2v_jax.git)
#   REF        branch, tag or commit to install (default: main)

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

REPO_URL="${REPO_URL:-https://github.com/st2v-jax/st2v_jax.git}"
REF="${REF:-main}"
require_vars ZONE

install_on_worker() {
  local repo_url=$1 ref=$2
  set -euo pipefail
  local checkout="$HOME/$WORKER_CHECKOUT" venv="$HOME/$WORKER_VENV"
  # init + fetch instead of clone: it takes a commit as well as a branch, and it updates an
  # existing checkout.
  git init -q "$checkout"
  git -C "$checkout" fetch -q --depth 1 "$repo_url" "$ref"
  git -C "$checkout" checkout -q --force --detach FETCH_HEAD
  # uv, because the TPU images' Python (3.10) is older than current jax needs: uv brings
  # its own interpreter, and installs jax[tpu] on every worker in seconds.
  python3 -m pip install -q --user --upgrade uv
  "$HOME/.local/bin/uv" venv -q --allow-existing --python 3.12 "$venv"
  # One resolution for both, so that jax, jaxlib and libtpu stay matched.
  "$HOME/.local/bin/uv" pip install -q --python "$venv/bin/python" -e "$checkout" "jax[tpu]"
  echo "$(hostname): st2v_jax $(git -C "$checkout" rev-parse --short HEAD) installed in $venv"
}

on_all_workers install_on_worker "$REPO_URL" "$REF"
