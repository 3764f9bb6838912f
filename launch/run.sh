#!/usr/bin/env bash
# Starts `python -m mmjax.main ARGS...` on every worker in the background, logging to ~/mmjax.log.
# On a pod slice every host must run the same command; jax.distributed is initialised by main.py.
#   launch/run.sh --config=mmjax/configs/shapes_preview.py --workdir=gs://BUCKET/run1
source "$(dirname "$0")/common.sh"
[ $# -gt 0 ] || { echo "usage: launch/run.sh --config=... --workdir=... [--config.FIELD=VALUE ...]" >&2; exit 2; }

args=$(printf '%q ' "$@")
on_all_workers "cd $REPO_DIR && JAX_PLATFORMS=tpu nohup .venv/bin/python -m mmjax.main $args > ~/mmjax.log 2>&1 &"
echo "Started on all workers of $TPU_NAME; follow with: launch/logs.sh"
