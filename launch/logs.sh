#!/usr/bin/env bash
# Prints the tail of every worker's log (TAIL_LINES=50), or with FETCH=DIR copies each log there.
source "$(dirname "$0")/common.sh"

if [ -n "${FETCH:-}" ]; then
  mkdir -p "$FETCH"
  gcloud compute tpus tpu-vm scp "$TPU_NAME:mmjax.log" "$FETCH/" "${GCLOUD_FLAGS[@]}" --worker=all
else
  on_all_workers "echo \"== \$(hostname)\"; tail -n ${TAIL_LINES:-50} ~/mmjax.log"
fi
