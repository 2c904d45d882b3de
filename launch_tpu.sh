#!/usr/bin/env bash
# Run one `m2d ...` command on every worker of a Cloud TPU VM (single host or pod slice). See --help.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch_tpu.sh --name NAME --zone ZONE --accelerator-type TYPE [options] -- m2d SUBCOMMAND [ARGS...]

Creates the TPU VM NAME (or reuses it when it already exists), installs this repository's HEAD on every worker,
runs the m2d command after `--` on all workers at once (--worker=all; jax finds the other hosts by itself), streams
the output to the terminal and a local log file, copies the outputs to a bucket from worker 0, and optionally
deletes the TPU VM.

Required:
  --name NAME               TPU VM (node) name
  --zone ZONE               e.g. us-east5-a
  --accelerator-type TYPE   e.g. v4-8, v5p-64, v5litepod-16, v6e-64
Options:
  --runtime-version V       TPU software version (default by type: v4 tpu-ubuntu2204-base, v5p v2-alpha-tpuv5,
                            v5litepod v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e)
  --project PROJECT         Google Cloud project (default: gcloud's configured project)
  --spot | --reserved       capacity: Spot VMs, or the project's reservation (default: on-demand)
  --queued                  request the VM through a queued resource NAME-qr and wait until it is ACTIVE
  --bucket gs://BUCKET/DIR  after the run, copy --outputs from worker 0 there (gcloud storage cp -r)
  --outputs DIR             directory on the workers, relative to the project checkout (default: runs)
  --log FILE                local log file (default: launch_tpu_NAME_DATE.log)
  --delete                  delete the TPU VM (or the queued resource) at the end, also when a step failed
  --dry-run                 print the commands instead of running them
  -h, --help                this help

Example:
  ./launch_tpu.sh --name m2d-v5p --zone us-east5-a --accelerator-type v5p-64 --spot --bucket gs://my-bucket/run1 \
    --delete -- m2d distill --config configs/distill/qwen3_30b_a3b.py --mesh v5p-64 --teacher ... --student ...

The m2d command runs in ~/m2d_jax on each worker; its relative paths (outputs, configs) are relative to that
directory. Environment: M2D_LAUNCH_POLL_SECONDS (queued-resource polling interval, default 30).
EOF
}

die() {
  echo "launch_tpu.sh: $*" >&2
  exit 2
}

name="" zone="" accelerator_type="" runtime_version="" project="" capacity="" queued=0 bucket="" outputs="runs"
log_file="" delete=0 dry_run=0
command_args=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --name | --zone | --accelerator-type | --runtime-version | --project | --bucket | --outputs | --log)
      (($# >= 2)) || die "$1 needs a value"
      case "$1" in
        --name) name="$2" ;;
        --zone) zone="$2" ;;
        --accelerator-type) accelerator_type="$2" ;;
        --runtime-version) runtime_version="$2" ;;
        --project) project="$2" ;;
        --bucket) bucket="$2" ;;
        --outputs) outputs="$2" ;;
        --log) log_file="$2" ;;
      esac
      shift 2 ;;
    --spot | --reserved)
      [[ -z "$capacity" || "$capacity" == "$1" ]] || die "--spot and --reserved exclude each other"
      capacity="$1"; shift ;;
    --queued) queued=1; shift ;;
    --delete) delete=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; command_args=("$@"); break ;;
    *) die "unknown argument '$1' (the m2d command goes after --; see --help)" ;;
  esac
done

[[ -n "$name" ]] || die "missing required flag --name NAME (see --help)"
[[ -n "$zone" ]] || die "missing required flag --zone ZONE (see --help)"
[[ -n "$accelerator_type" ]] || die "missing required flag --accelerator-type TYPE, e.g. v5p-64 (see --help)"
((${#command_args[@]})) || die "missing the command to run: -- m2d SUBCOMMAND [ARGS...] (see --help)"
[[ "${command_args[0]}" == "m2d" ]] || die "the command after -- must be an m2d command, got '${command_args[0]}'"
[[ -z "$bucket" || "$bucket" == gs://* ]] || die "--bucket must be a gs:// URL, got '$bucket'"
if [[ -z "$runtime_version" ]]; then
  case "$accelerator_type" in
    v4-*) runtime_version="tpu-ubuntu2204-base" ;;
    v5p-*) runtime_version="v2-alpha-tpuv5" ;;
    v5litepod-*) runtime_version="v2-alpha-tpuv5-lite" ;;
    v6e-*) runtime_version="v2-alpha-tpuv6e" ;;
    *) die "no default --runtime-version for --accelerator-type '$accelerator_type'; give one" ;;
  esac
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
jax_version="$(sed -n 's/^jax==//p' "$root/constraints.txt")"
[[ -n "$jax_version" ]] || die "$root/constraints.txt: no 'jax==VERSION' pin (needed for the matching jax[tpu])"
log_file="${log_file:-launch_tpu_${name}_$(date +%Y%m%d-%H%M%S).log}"
queued_resource="${name}-qr"
remote_dir="m2d_jax"
venv="m2d_venv"
gcloud_flags=("--zone=$zone")
[[ -z "$project" ]] || gcloud_flags+=("--project=$project")

# One line, shell-quoted only where needed, for the log and --dry-run.
quoted() {
  local arg out=()
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
      out+=("$arg")
    else
      out+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

# Runs (or with --dry-run prints) a command; its output goes to the terminal and the log file.
run() {
  if ((dry_run)); then
    quoted "$@"
    return 0
  fi
  echo "+ $(quoted "$@")" | tee -a "$log_file"
  "$@" 2>&1 | tee -a "$log_file"
}

tpu_vm() { run gcloud compute tpus tpu-vm "$1" "${@:2}" "${gcloud_flags[@]}"; }

on_workers() {  # on_workers WORKER COMMAND
  tpu_vm ssh "$name" "--worker=$1" "--command=$2"
}

exists() {  # the TPU VM exists (with --dry-run: printed, assumed not)
  if ((dry_run)); then
    quoted gcloud compute tpus tpu-vm describe "$name" "${gcloud_flags[@]}"
    return 1
  fi
  gcloud compute tpus tpu-vm describe "$name" "${gcloud_flags[@]}" >>"$log_file" 2>&1
}

create() {
  local capacity_flags=()
  [[ -z "$capacity" ]] || capacity_flags=("$capacity")
  if ((!queued)); then
    tpu_vm create "$name" "--accelerator-type=$accelerator_type" "--version=$runtime_version" \
      "${capacity_flags[@]}"
    return
  fi
  run gcloud compute tpus queued-resources create "$queued_resource" "--node-id=$name" \
    "--accelerator-type=$accelerator_type" "--runtime-version=$runtime_version" "${capacity_flags[@]}" \
    "${gcloud_flags[@]}"
  local state
  while :; do
    if ((dry_run)); then
      quoted gcloud compute tpus queued-resources describe "$queued_resource" "--format=value(state.state)" \
        "${gcloud_flags[@]}"
      return
    fi
    state="$(gcloud compute tpus queued-resources describe "$queued_resource" "--format=value(state.state)" \
      "${gcloud_flags[@]}")"
    echo "queued resource $queued_resource: $state" | tee -a "$log_file"
    case "$state" in
      ACTIVE) return ;;
      FAILED | SUSPENDED) die "queued resource $queued_resource is $state (gcloud compute tpus queued-resources" \
        "describe $queued_resource --zone=$zone)" ;;
    esac
    sleep "${M2D_LAUNCH_POLL_SECONDS:-30}"
  done
}

# shellcheck disable=SC2329  # called from finish, the EXIT trap
delete_tpu() {
  if ((queued)); then
    run gcloud compute tpus queued-resources delete "$queued_resource" --force --quiet "${gcloud_flags[@]}"
  else
    tpu_vm delete "$name" --quiet
  fi
}

archive="$(mktemp -t m2d_jax_XXXXXX.tar.gz)"
# shellcheck disable=SC2329  # the EXIT trap
finish() {
  local status=$?
  rm -f "$archive"
  if ((delete)); then
    delete_tpu || status=$?
  fi
  ((dry_run)) || echo "log: $log_file" >&2
  exit "$status"
}
trap finish EXIT

if exists; then
  echo "reusing TPU VM $name" | tee -a "$log_file"
else
  create
fi
[[ -z "$(git -C "$root" status --porcelain --untracked-files=no)" ]] ||
  echo "launch_tpu.sh: note: uncommitted changes in $root are not sent (the workers get HEAD)" >&2
run git -C "$root" archive --format=tar.gz "--output=$archive" HEAD
tpu_vm scp "$archive" "$name:$remote_dir.tar.gz" --worker=all
# The TPU images' system Python is older than the project needs: uv brings Python 3.12 into a venv; then the
# README's install (without the test extra, whose torch is not needed on the workers) and the matching jax[tpu].
uv="\$HOME/.local/bin/uv"  # expanded on the workers
install=(
  "set -e" "rm -rf ~/$remote_dir" "mkdir -p ~/$remote_dir" "tar -xzf ~/$remote_dir.tar.gz -C ~/$remote_dir"
  "cd ~/$remote_dir" "python3 -m pip install --user --quiet uv" "$uv venv --python 3.12 --allow-existing ~/$venv"
  ". ~/$venv/bin/activate" "$uv pip install -e . -c constraints.txt"
  "$uv pip install 'jax[tpu]==$jax_version' -c constraints.txt"
)
printf -v install_command '%s; ' "${install[@]}"
on_workers all "${install_command%; }"
status=0
on_workers all "cd ~/$remote_dir && . ~/$venv/bin/activate && $(quoted "${command_args[@]}")" || status=$?
if [[ -n "$bucket" ]]; then
  on_workers 0 "cd ~/$remote_dir && gcloud storage cp -r $(quoted "$outputs" "$bucket")" || status=$?
fi
exit "$status"
