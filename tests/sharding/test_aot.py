"""Compile-only checks against TPU topologies (libtpu, no TPU): meshes, real memory analysis, errors."""

import importlib.util
import os

import jax
import numpy as np
import pytest

from mmjax import sharding
from mmjax.configs import common
from mmjax.errors import ConfigError
from tests.tools import aot_fixture, aot_fixture_config

pytest.importorskip("libtpu", reason="AOT checks need libtpu (pip install 'mmjax[aot]')")

F32 = 4


def test_topology_devices_and_mesh():
  devices = sharding.topology_devices("v5e:2x2")
  assert len(devices) == 4
  assert {d.device_kind for d in devices} == {"TPU v5 lite"} and {d.platform for d in devices} == {"tpu"}
  mesh = sharding.topology_mesh("v5e:2x2", common.mesh_config(data=1, fsdp=-1))
  assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 1}
  assert {d.id for d in mesh.devices.flat} == {d.id for d in devices}
  # v4 is megacore: one device per chip, like a real v4 slice under JAX.
  assert len(sharding.topology_devices("v4:2x2x1")) == 4


def test_libtpu_init_env_is_not_left_behind():
  before = {k: os.environ.get(k) for k in ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES",
                                         "ALLOW_MULTIPLE_LIBTPU_LOAD")}
  sharding.topology_devices("v6e:2x2")
  assert {k: os.environ.get(k) for k in before} == before


def test_multi_slice_mesh_groups_devices_by_slice():
  devices = sharding.topology_devices("v5e:2x2", num_slices=2)
  assert sharding.count_slices(devices) == 2
  mesh = sharding.create_mesh(common.mesh_config(data=1, fsdp=-1, dcn_data=2), devices)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  slice_ids = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  assert (slice_ids[0] == 0).all() and (slice_ids[1] == 1).all()
  with pytest.raises(ConfigError, match="form 2 slice"):
    sharding.create_mesh(common.mesh_config(data=-1), devices)


def _compile(config, topology="v5e:2x2"):
  mesh = sharding.topology_mesh(topology, config.mesh)
  step, args = aot_fixture.aot_train_step(config, mesh)
  compiled = sharding.compile_for_mesh(step, args, mesh, config.logical_axis_rules)
  return sharding.memory_report(compiled, topology, mesh.size)


def test_memory_report_of_a_real_train_step():
  config = aot_fixture_config.get_config("tiny")
  report = _compile(config)
  assert report.device_kind == "TPU v5 lite" and report.num_devices == 4
  expected = aot_fixture.expected_argument_bytes(config, param_ways=4, batch_ways=4)
  assert expected <= report.argument_bytes <= expected + aot_fixture.SCALAR_SLACK
  # The state is donated: its outputs reuse the argument buffers.
  state_bytes = 3 * 2 * config.model.embed * config.model.mlp * F32 // 4
  assert state_bytes <= report.alias_bytes <= state_bytes + aot_fixture.SCALAR_SLACK
  assert report.hbm_bytes == 16 * 2**30 and report.fits
  assert report.total_bytes == (report.argument_bytes + report.output_bytes - report.alias_bytes
                                + report.temp_bytes + report.generated_code_bytes)
  table = report.table()
  assert f"{report.argument_bytes:,d} B" in table and "17,179,869,184 B" in table and "fits" in table

  # Halve the fsdp axis: each device holds twice the state, and the batch still splits 4 ways.
  config.mesh = common.mesh_config(data=2, fsdp=-1)
  wider = _compile(config)
  expected = aot_fixture.expected_argument_bytes(config, param_ways=2, batch_ways=4)
  assert expected <= wider.argument_bytes <= expected + aot_fixture.SCALAR_SLACK


def test_a_step_too_large_for_hbm():
  with pytest.raises(sharding.DoesNotFitError, match="RESOURCE_EXHAUSTED"):
    _compile(aot_fixture_config.get_config("huge"))


def test_hbm_table():
  assert sharding.tpu_generation("v5p:2x2x1").hbm_bytes_per_device == 95 * 2**30
  assert sharding.tpu_generation("v3:4x4").hbm_bytes_per_device == 16 * 2**30  # per core
  assert sharding.tpu_generation("v2:2x2").hbm_bytes_per_device == 8 * 2**30
  assert {g: sharding.TPU_GENERATIONS[g].hbm_gib_per_chip for g in ("v4", "v5e", "v6e")} == \
      {"v4": 32, "v5e": 16, "v6e": 32}


@pytest.mark.parametrize("topology, fragment", [
    ("v5e", "expected GENERATION:SHAPE"),
    ("v9:2x2", "expected GENERATION:SHAPE"),
    ("v5e:3x3", "libtpu cannot build it"),
])
def test_bad_topology(topology, fragment):
  with pytest.raises(ConfigError, match=fragment):
    sharding.topology_devices(topology)


def test_missing_libtpu_says_how_to_install(monkeypatch):
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "libtpu" else real_find_spec(name, *a))
  monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
  with pytest.raises(ImportError, match=r"pip install 'mmjax\[aot\]'"):
    sharding.topology_devices("v5e:2x2")


def test_cpu_devices_are_untouched():
  assert jax.devices()[0].platform == "cpu" and jax.device_count() == 8
