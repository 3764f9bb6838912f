#!/usr/bin/env bash
# Deletes the TPU VM (or the queued resource with QUEUED=1).
source "$(dirname "$0")/common.sh"
if [ "${QUEUED:-0}" = 1 ]; then
  gcloud compute tpus queued-resources delete "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --force --quiet
else
  gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --quiet
fi
