# Shared settings for the launch scripts; every value can be overridden from the environment.
#   TPU_NAME   name of the TPU VM / queued resource     (default: mmjax-$USER)
#   ZONE       GCP zone                                  (default: us-central2-b)
#   ACCELERATOR  TPU type, e.g. v5litepod-16, v4-64      (default: v4-8)
#   RUNTIME    TPU software version (default: chosen from ACCELERATOR)
#   PROJECT    GCP project (default: gcloud's configured project)
set -euo pipefail

TPU_NAME=${TPU_NAME:-mmjax-${USER:-user}}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR=${ACCELERATOR:-v4-8}
REPO_DIR=${REPO_DIR:-mmjax}

default_runtime() {
  case "$1" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo "launch: no default runtime for ACCELERATOR=$1; set RUNTIME" >&2; return 1 ;;
  esac
}
RUNTIME=${RUNTIME:-$(default_runtime "$ACCELERATOR")}

GCLOUD_FLAGS=(--zone="$ZONE")
[ -n "${PROJECT:-}" ] && GCLOUD_FLAGS+=(--project="$PROJECT")

# Runs a command on every worker of the TPU VM (each host of a pod slice).
on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --worker=all --command="$1"
}
