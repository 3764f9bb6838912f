#!/usr/bin/env bash
# Copies this checkout to every worker and installs mmjax with the TPU extra there.
#   launch/install.sh
source "$(dirname "$0")/common.sh"
root=$(cd "$(dirname "$0")/.." && pwd)

archive=$(mktemp --suffix=.tar.gz)
trap 'rm -f "$archive"' EXIT
git -C "$root" archive --format=tar.gz -o "$archive" HEAD
gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:mmjax.tar.gz" "${GCLOUD_FLAGS[@]}" --worker=all
on_all_workers "mkdir -p $REPO_DIR && tar -xzf mmjax.tar.gz -C $REPO_DIR && \
  cd $REPO_DIR && (python3 -m venv .venv || (sudo apt-get -qq update && sudo apt-get -qq install -y python3-venv && python3 -m venv .venv)) && .venv/bin/pip install -q -U pip && \
  .venv/bin/pip install -q -e '.[tpu]' && .venv/bin/python -c 'import jax; print(jax.process_index(), jax.device_count())'"
