"""The device mesh from `config.mesh`: ICI sizes within a slice, DCN sizes across slices.

Every mesh has the axes ("data", "fsdp", "tensor"); an axis's size is its ICI size times its DCN
size (maxtext style), so models and rules never need to know whether a run is multi-slice.
"""

import math

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils

from mmjax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")


def _read_sizes(mesh_config, network):
  """Reads config.mesh.<network>.{data,fsdp,tensor} as ints, naming the field on any mistake."""
  field = f"config.mesh.{network}"
  if network not in mesh_config:
    raise ConfigError(f"{field} is missing: expected sizes for {', '.join(MESH_AXES)}")
  group = mesh_config[network]
  unknown = sorted(set(group.keys()) - set(MESH_AXES))
  if unknown:
    raise ConfigError(f"{field} has unknown axes {unknown}: expected only {', '.join(MESH_AXES)}")
  sizes = {}
  for axis in MESH_AXES:
    size = group.get(axis, 1)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
      raise ConfigError(f"{field}.{axis}={size!r}: expected an integer")
    if size == 0 or size < -1 or (size == -1 and network == "dcn"):
      allowed = "a positive integer" if network == "dcn" else "a positive integer or -1 (the rest)"
      raise ConfigError(f"{field}.{axis}={size}: expected {allowed}")
    sizes[axis] = int(size)
  return sizes


def _describe(sizes):
  return ", ".join(f"{axis}={size}" for axis, size in sizes.items())


def resolve_ici_dcn(mesh_config, num_devices, num_slices=1):
  """Returns (ici, dcn) dicts of axis -> size with any -1 filled in; raises ConfigError."""
  ici, dcn = _read_sizes(mesh_config, "ici"), _read_sizes(mesh_config, "dcn")
  if num_slices is None:  # devices carry no slice info: the DCN sizes say how many slices
    num_slices = math.prod(dcn.values())
  if math.prod(dcn.values()) != num_slices:
    raise ConfigError(f"config.mesh.dcn sizes ({_describe(dcn)}) multiply to {math.prod(dcn.values())}, "
                      f"but the devices form {num_slices} slice(s)")
  if num_devices % num_slices:
    raise ConfigError(f"config.mesh.dcn: {num_devices} devices do not split into {num_slices} equal slices")
  per_slice = num_devices // num_slices
  fill = [axis for axis, size in ici.items() if size == -1]
  if len(fill) > 1:
    raise ConfigError(f"config.mesh.ici has more than one -1 ({', '.join(fill)}): at most one axis "
                      "may take the rest of the devices")
  known = math.prod(size for size in ici.values() if size != -1)
  if fill:
    if per_slice % known:
      raise ConfigError(f"config.mesh.ici.{fill[0]}=-1 cannot take the rest: the other ICI sizes "
                        f"({_describe(ici)}) multiply to {known}, which does not divide the "
                        f"{per_slice} devices per slice ({num_devices} devices)")
    ici[fill[0]] = per_slice // known
  elif known != per_slice:
    raise ConfigError(f"config.mesh.ici sizes ({_describe(ici)}) multiply to {known}, but each slice has "
                      f"{per_slice} devices ({num_devices} devices, {num_slices} slice(s)); "
                      "set one of them to -1 to take the rest")
  return ici, dcn


def resolve_mesh_shape(mesh_config, num_devices, num_slices=1):
  """Returns {"data": n, "fsdp": n, "tensor": n}, each axis's ICI × DCN size (pure; for checks and tests).

  `num_slices=None` means the devices carry no slice info and the DCN sizes define the slices.
  """
  ici, dcn = resolve_ici_dcn(mesh_config, num_devices, num_slices)
  return {axis: ici[axis] * dcn[axis] for axis in MESH_AXES}


def count_slices(devices):
  """The number of slices the devices belong to, or None when they carry no `slice_index`."""
  if not all(hasattr(d, "slice_index") for d in devices):
    return None
  return len({d.slice_index for d in devices})


def _ici_device_array(shape, devices):
  """Devices of one slice arranged as `shape`, following physical ICI rings where the topology allows."""
  for split in (False, True):
    try:
      return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=split)
    except (ValueError, NotImplementedError, AssertionError) as e:
      reason = e
  logging.warning("ICI mesh %s does not map onto the physical topology (%s); using device order, so "
                  "collectives may not follow physical rings", shape, reason)
  return np.asarray(devices, dtype=object).reshape(shape)


def _contiguous_hybrid_array(ici_shape, dcn_shape, devices):
  """Like mesh_utils.create_hybrid_device_mesh, but slices are contiguous runs of the device list."""
  num_slices = math.prod(dcn_shape)
  per_slice = len(devices) // num_slices
  slice_arrays = [_ici_device_array(ici_shape, devices[i * per_slice:(i + 1) * per_slice])
                  for i in range(num_slices)]
  blocks = np.empty(dcn_shape, dtype=object)
  for i, index in enumerate(np.ndindex(*dcn_shape)):
    blocks[index] = slice_arrays[i]
  return np.block(blocks.tolist())


def create_mesh(mesh_config, devices=None):
  """A jax.sharding.Mesh with axes ("data", "fsdp", "tensor") (AxisType.Auto) from `config.mesh`.

  Devices with a `slice_index` (multi-slice TPUs) are grouped by slice; devices without one
  (CPU, single-slice topologies) are cut into contiguous slices when the DCN sizes ask for several.
  """
  devices = list(jax.devices() if devices is None else devices)
  num_slices = count_slices(devices)
  ici, dcn = resolve_ici_dcn(mesh_config, len(devices), num_slices)
  ici_shape, dcn_shape = tuple(ici.values()), tuple(dcn.values())
  if math.prod(dcn_shape) == 1:
    device_array = _ici_device_array(ici_shape, devices)
  elif num_slices is not None:
    device_array = mesh_utils.create_hybrid_device_mesh(
        ici_shape, dcn_shape, devices, allow_split_physical_axes=True)
  else:
    device_array = _contiguous_hybrid_array(ici_shape, dcn_shape, devices)
  return jax.sharding.Mesh(device_array, MESH_AXES,
                           axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
