"""The launch scripts, run against a stand-in `gcloud` that records each call."""

import os
import pathlib
import subprocess

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "launch"


@pytest.fixture
def fake_gcloud(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log = tmp_path / "gcloud.log"
  script = bin_dir / "gcloud"
  script.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> {log}\n')
  script.chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TPU_NAME="t1", ZONE="us-west4-a")
  return env, log


def _run(name, env, *args, **extra_env):
  return subprocess.run(["bash", str(LAUNCH / name), *args], env=dict(env, **extra_env),
                        capture_output=True, text=True, timeout=60, check=False)


def test_create_picks_runtime_for_accelerator(fake_gcloud):
  env, log = fake_gcloud
  assert _run("create.sh", env, ACCELERATOR="v5litepod-16").returncode == 0
  assert _run("create.sh", env, ACCELERATOR="v4-64", QUEUED="1", SPOT="1").returncode == 0
  calls = log.read_text().splitlines()
  assert calls[0] == ("compute tpus tpu-vm create t1 --zone=us-west4-a "
                      "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite")
  assert calls[1].startswith("compute tpus queued-resources create t1 --zone=us-west4-a --node-id=t1 "
                             "--accelerator-type=v4-64 --runtime-version=tpu-ubuntu2204-base")
  assert calls[1].endswith("--spot")


def test_unknown_accelerator_needs_runtime(fake_gcloud):
  env, log = fake_gcloud
  result = _run("create.sh", env, ACCELERATOR="v9-8")
  assert result.returncode != 0 and "set RUNTIME" in result.stderr
  assert not log.exists()


def test_run_quotes_arguments_on_all_workers(fake_gcloud):
  env, log = fake_gcloud
  assert _run("run.sh", env, "--config=mmjax/configs/shapes_preview.py", "--workdir=gs://b/run 1").returncode == 0
  call = log.read_text().strip()
  assert call.startswith("compute tpus tpu-vm ssh t1 --zone=us-west4-a --worker=all --command=")
  assert "python -m mmjax.main --config=mmjax/configs/shapes_preview.py --workdir=gs://b/run\\ 1" in call
  assert _run("run.sh", env).returncode == 2


def test_delete_and_logs(fake_gcloud):
  env, log = fake_gcloud
  assert _run("logs.sh", env).returncode == 0
  assert _run("delete.sh", env, QUEUED="1").returncode == 0
  calls = log.read_text().splitlines()
  assert "tail -n 50 ~/mmjax.log" in calls[0]
  assert calls[1] == "compute tpus queued-resources delete t1 --zone=us-west4-a --force --quiet"
