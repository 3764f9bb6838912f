"""Mesh shapes from config.mesh: ICI sizes, -1, DCN (multi-slice) and one-line errors naming the field."""

import jax
import numpy as np
import pytest

from mmjax import sharding
from mmjax.configs import common
from mmjax.errors import ConfigError


@pytest.mark.parametrize("sizes, num_devices, num_slices, expected", [
    (dict(data=-1), 8, 1, {"data": 8, "fsdp": 1, "tensor": 1}),
    (dict(data=1, fsdp=-1, tensor=2), 8, 1, {"data": 1, "fsdp": 4, "tensor": 2}),
    (dict(data=2, fsdp=2, tensor=2), 8, 1, {"data": 2, "fsdp": 2, "tensor": 2}),
    (dict(data=1, fsdp=2, tensor=-1), 256, 1, {"data": 1, "fsdp": 2, "tensor": 128}),
    # multi-slice: the mesh axis size is ICI × DCN
    (dict(data=-1, fsdp=2, dcn_data=2), 8, 2, {"data": 4, "fsdp": 2, "tensor": 1}),
    (dict(data=1, fsdp=-1, dcn_data=2, dcn_fsdp=2), 64, 4, {"data": 2, "fsdp": 32, "tensor": 1}),
    (dict(data=1, fsdp=-1, dcn_fsdp=4), 8, None, {"data": 1, "fsdp": 8, "tensor": 1}),
])
def test_resolve_mesh_shape(sizes, num_devices, num_slices, expected):
  shape = sharding.resolve_mesh_shape(common.mesh_config(**sizes), num_devices, num_slices)
  assert shape == expected
  assert list(shape) == ["data", "fsdp", "tensor"]


def test_resolve_ici_dcn_keeps_the_two_networks_apart():
  ici, dcn = sharding.resolve_ici_dcn(common.mesh_config(data=-1, tensor=2, dcn_data=2), 16, 2)
  assert ici == {"data": 4, "fsdp": 1, "tensor": 2}
  assert dcn == {"data": 2, "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize("sizes, num_devices, num_slices, fragments", [
    (dict(data=-1, fsdp=-1), 8, 1, ["config.mesh.ici", "more than one -1", "data, fsdp"]),
    (dict(data=2, fsdp=2, tensor=4), 8, 1, ["config.mesh.ici", "multiply to 16", "8 devices"]),
    (dict(data=-1, tensor=3), 8, 1, ["config.mesh.ici.data=-1", "multiply to 3", "8 devices"]),
    (dict(data=-1, tensor=0), 8, 1, ["config.mesh.ici.tensor=0", "positive"]),
    (dict(data=-1, fsdp=-2), 8, 1, ["config.mesh.ici.fsdp=-2"]),
    (dict(data=-1, dcn_data=-1), 8, 1, ["config.mesh.dcn.data=-1", "positive integer"]),
    (dict(data=-1, dcn_data=2), 8, 1, ["config.mesh.dcn", "multiply to 2", "1 slice"]),
    (dict(data=-1, dcn_data=3), 8, None, ["config.mesh.dcn", "8 devices", "3 equal slices"]),
    (dict(data=2.5), 8, 1, ["config.mesh.ici.data=2.5", "integer"]),
])
def test_bad_mesh_config_names_the_field(sizes, num_devices, num_slices, fragments):
  with pytest.raises(ConfigError) as e:
    sharding.resolve_mesh_shape(common.mesh_config(**sizes), num_devices, num_slices)
  message = str(e.value)
  assert "\n" not in message
  for fragment in fragments:
    assert fragment in message, message


def test_unknown_mesh_axis_in_config():
  config = common.mesh_config()
  config.ici.sequence = 2
  with pytest.raises(ConfigError, match=r"config.mesh.ici has unknown axes \['sequence'\]"):
    sharding.resolve_mesh_shape(config, 8)


def test_create_mesh_on_the_fake_cpu_devices():
  mesh = sharding.create_mesh(common.mesh_config(data=2, fsdp=-1, tensor=2))
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_create_mesh_with_dcn_groups_contiguous_slices():
  devices = jax.devices()
  mesh = sharding.create_mesh(common.mesh_config(data=1, fsdp=-1, dcn_data=2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  # Each DCN data index is one slice: a contiguous run of 4 devices.
  assert {d.id for d in mesh.devices[0].flat} == {d.id for d in devices[:4]}
  assert {d.id for d in mesh.devices[1].flat} == {d.id for d in devices[4:]}

  mesh = sharding.create_mesh(common.mesh_config(data=2, fsdp=1, tensor=-1, dcn_tensor=2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4}
  ids = np.vectorize(lambda d: d.id)(mesh.devices)
  # tensor = ICI tensor (2) × DCN tensor (2): the first two tensor positions are slice 0.
  assert set(ids[:, :, :2].flat) == {0, 1, 2, 3}
  assert set(ids[:, :, 2:].flat) == {4, 5, 6, 7}


def test_create_mesh_on_a_device_subset():
  mesh = sharding.create_mesh(common.mesh_config(data=-1), devices=jax.devices()[:4])
  assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 1}
  with pytest.raises(ConfigError, match="4 devices"):
    sharding.create_mesh(common.mesh_config(data=8), devices=jax.devices()[:4])
