"""`python -m mmjax.tools.aot`: compiles a config's train step for a TPU slice and reports memory."""

import os
import re
import subprocess
import sys

import pytest

from tests.tools import aot_fixture_config
from tests.tools.aot_fixture import SCALAR_SLACK, expected_argument_bytes

pytest.importorskip("libtpu", reason="AOT checks need libtpu (pip install 'mmjax[aot]')")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = "--config=tests/tools/aot_fixture_config.py"


def _aot(*args):
  env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run([sys.executable, "-m", "mmjax.tools.aot", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=180, check=False)


def _bytes(stdout, row):
  match = re.search(rf"^\s+{re.escape(row)}\s.*?(-?[\d,]+) B$", stdout, re.MULTILINE)
  assert match, stdout
  return int(match.group(1).replace(",", ""))


def _last_error_line(result):
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  return result.stderr.strip().splitlines()[-1]


def test_help_is_useful():
  result = _aot("--help")
  assert "Traceback" not in result.stderr  # (absl's --help exit status is up to mmjax.cli's parser)
  for text in ("--config", "--topology", "v5e:4x4", "--num_slices", "--hbm_gib", "--config.FIELD=VALUE",
               "aot_train_step(config, mesh)", "pip install 'mmjax[aot]'"):
    assert text in result.stdout, text


@pytest.mark.parametrize("overrides, param_ways, batch_ways", [
    ((), 4, 4),                                                      # fsdp=-1 → 4
    (("--config.mesh.ici.data=2", "--config.mesh.ici.fsdp=2"), 2, 4),
])
def test_reports_real_per_device_bytes(overrides, param_ways, batch_ways):
  result = _aot(f"{CONFIG}:tiny", "--topology=v5e:2x2", *overrides)
  assert result.returncode == 0, result.stderr[-3000:]
  expected = expected_argument_bytes(aot_fixture_config.get_config("tiny"), param_ways, batch_ways)
  arguments = _bytes(result.stdout, "arguments")
  assert expected <= arguments <= expected + SCALAR_SLACK, result.stdout
  assert _bytes(result.stdout, "HBM per device") == 16 * 2**30
  total = _bytes(result.stdout, "total per device")
  assert _bytes(result.stdout, "aliased (donated)") < 0  # donated state: shown as a deduction
  assert total == (arguments + _bytes(result.stdout, "outputs") + _bytes(result.stdout, "aliased (donated)")
                   + _bytes(result.stdout, "temporaries") + _bytes(result.stdout, "generated code"))
  assert "v5e:2x2: 4 x TPU v5 lite" in result.stdout and "fits:" in result.stdout


def test_too_large_config_exits_non_zero():
  result = _aot(f"{CONFIG}:huge", "--topology=v5e:2x2")
  assert result.returncode == 1
  assert _last_error_line(result).startswith("mmjax.tools.aot: does not fit v5e:2x2: RESOURCE_EXHAUSTED")


def test_smaller_hbm_budget_exits_non_zero_after_the_report():
  result = _aot(f"{CONFIG}:tiny", "--topology=v5e:2x2", "--hbm_gib=0.0001")
  assert result.returncode == 1
  assert "DOES NOT FIT" in result.stdout
  assert re.fullmatch(r"mmjax.tools.aot: does not fit v5e:2x2: [\d.]+ [KM]iB per device > 104.86 KiB HBM "
                      r"per TPU v5 lite device", _last_error_line(result))


@pytest.mark.parametrize("args, message", [
    (("--config.trainer=tests.tools.no_step_fixture",),
     "config.trainer='tests.tools.no_step_fixture' has no train step to compile"),
    (("--config.model.embed=130",),
     "params/Dense_0/kernel dim 0 (embed=130) is not divisible by mesh axis 'fsdp' of size 4"),
    (("--config.mesh.ici.tensor=3",), "config.mesh.ici"),
])
def test_config_that_cannot_compile_exits_with_one_line(args, message):
  result = _aot(f"{CONFIG}:tiny", "--topology=v5e:2x2", *args)
  assert result.returncode == 2
  assert message in _last_error_line(result)


def test_bad_topology_exits_with_one_line():
  result = _aot(f"{CONFIG}:tiny", "--topology=v5e:3x3")
  assert result.returncode == 2
  assert "topology 'v5e:3x3': libtpu cannot build it" in _last_error_line(result)
