#!/usr/bin/env bash
# Creates a TPU VM (or, with QUEUED=1, a queued resource, optionally SPOT=1).
#   ACCELERATOR=v5litepod-16 ZONE=us-west4-a launch/create.sh
source "$(dirname "$0")/common.sh"

if [ "${QUEUED:-0}" = 1 ]; then
  extra=()
  [ "${SPOT:-0}" = 1 ] && extra+=(--spot)
  gcloud compute tpus queued-resources create "$TPU_NAME" "${GCLOUD_FLAGS[@]}" \
    --node-id="$TPU_NAME" --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" "${extra[@]}"
  echo "Queued $TPU_NAME; watch it with: gcloud compute tpus queued-resources describe $TPU_NAME --zone=$ZONE"
else
  gcloud compute tpus tpu-vm create "$TPU_NAME" "${GCLOUD_FLAGS[@]}" \
    --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
fi
