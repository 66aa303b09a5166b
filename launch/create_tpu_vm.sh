#!/usr/bin/env bash
# Creates a Cloud TPU VM: a single host (v5litepod-8, v6e-8) or a pod slice of several
# workers (v5litepod-32, v6e-32). Then launch/install.sh sets up st2v_jax on it.
#
#   ZONE=us-west4-a launch/create_tpu_vm.sh
#   ZONE=us-east5-b ACCELERATOR_TYPE=v6e-8 TPU_NAME=st2v-v6e launch/create_tpu_vm.sh
#
# Environment:
#   ZONE              (required) a zone that offers ACCELERATOR_TYPE to your project
#   TPU_NAME          name of the TPU VM (default: st2v)
#   ACCELERATOR_TYPE  TPU type and size (default: v5litepod-8)
#   RUNTIME_VERSION   TPU software image; default by type: v5litepod-* v2-alpha-tpuv5-lite,
#                     v6e-* v2-alpha-tpuv6e, v5p-* v2-alpha-tpuv5, v4-* tpu-ubuntu2204-base
#   PROJECT           Google Cloud project (default: gcloud's configured project)
#   SPOT              1: a spot VM (cheaper, can be preempted; training and sampling resume)

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-8}"
case "$ACCELERATOR_TYPE" in
  v5litepod-*) default_runtime=v2-alpha-tpuv5-lite ;;
  v6e-*) default_runtime=v2-alpha-tpuv6e ;;
  v5p-*) default_runtime=v2-alpha-tpuv5 ;;
  v4-*) default_runtime=tpu-ubuntu2204-base ;;
  *) default_runtime= ;;
esac
RUNTIME_VERSION="${RUNTIME_VERSION:-$default_runtime}"
require_vars ZONE RUNTIME_VERSION

spot=()
if [[ "${SPOT:-0}" == 1 ]]; then
  spot=(--spot)
fi
gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" ${PROJECT:+"--project=$PROJECT"} \
  --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${spot[@]}"
