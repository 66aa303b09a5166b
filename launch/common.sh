# shellcheck shell=bash
# Sourced by the launch scripts: which TPU VM they reach, and the layout on its workers.

TPU_NAME="${TPU_NAME:-st2v}"
PROJECT="${PROJECT:-}"

# On each worker, under the home folder: the checkout of st2v_jax and its virtualenv
# (made by install.sh, used by run_on_workers.sh).
WORKER_CHECKOUT=st2v_jax WORKER_VENV=st2v_venv

# A script's usage is its header comment: the lines after the shebang, up to the first blank line.
usage() {
  sed -n '2,/^$/s/^# \{0,1\}//p' "$0" >&2
}

# Stops with the usage unless every variable named is set (no default fits everyone).
require_vars() {
  local name missing=()
  for name in "$@"; do
    [[ -n "${!name:-}" ]] || missing+=("$name")
  done
  if ((${#missing[@]})); then
    usage
    echo "error: set ${missing[*]}" >&2
    exit 2
  fi
}

# Stops with the usage when a script that passes its arguments on was given none.
require_arguments() {
  if (($# == 0)); then
    usage
    echo "error: no arguments given" >&2
    exit 2
  fi
}

# Runs the shell function $1 with the remaining arguments on every worker at the same time:
# the function, the worker layout and the quoted arguments travel as bash source in the ssh
# command. All workers, because a pod slice's TPU runtime starts only when every host runs
# the program (on a single-host VM, "all" is the one worker).
on_all_workers() {
  local function=$1
  shift
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" ${PROJECT:+"--project=$PROJECT"} --worker=all \
    --command="$(declare -p WORKER_CHECKOUT WORKER_VENV); $(declare -f "$function"); $function $(printf '%q ' "$@")"
}
