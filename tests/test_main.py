"""The absl entry point: help, and config mistakes reported as one line naming the field."""

import os
import subprocess
import sys

import pytest

CONFIG = "--config=mmjax/configs/shapes_preview.py"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  return subprocess.run([sys.executable, "-m", "mmjax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120, check=False)


def test_help_describes_the_flags():
  result = _main("--help")
  assert result.returncode == 0
  for flag in ("--config", "--workdir", "--distributed", "--config.FIELD=VALUE"):
    assert flag in result.stdout


@pytest.mark.parametrize("args, expected", [
    (["--config.data.no_such_field=1"], "--config.data.no_such_field"),
    (["--config.seed=abc"], "--config.seed"),
    (["--config.mesh.ici.tensor=3"], "config.mesh.ici"),
    (["--config.data.global_batch=12"], "config.data.global_batch"),
])
def test_bad_config_fails_with_one_line(tmp_path, args, expected):
  result = _main(CONFIG, f"--workdir={tmp_path}", *args)
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("mmjax: error:") and expected in last, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert not any(tmp_path.iterdir()), "nothing may be written before the config is checked"


def test_missing_config_file(tmp_path):
  result = _main("--config=mmjax/configs/no_such_config.py", f"--workdir={tmp_path}")
  assert result.returncode != 0
  assert "no_such_config.py" in result.stderr.strip().splitlines()[-1]
