"""Global batches from host-local data, and a per-array sharding report.

The batch dimension is split over the mesh axes the rules give `activation_batch`; each process
feeds the rows of the batch shards its devices hold (`process_batch_size` of them).
"""

import math

import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from mmjax.errors import ConfigError, DataError
from mmjax.sharding import rules as rules_lib

BATCH_AXIS = "activation_batch"


def batch_axes(rules):
  """The mesh axes the batch dimension is split over (the `activation_batch` rule's target)."""
  targets = dict(rules_lib.normalize_rules(rules))
  return rules_lib.mesh_axes_of(targets.get(BATCH_AXIS))


def batch_sharding(mesh, rules):
  """NamedSharding splitting dim 0 over the batch mesh axes; other dims replicated."""
  rules_lib.validate_rules(rules, mesh)
  axes = batch_axes(rules)
  return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def _batch_shards(mesh, rules):
  """(total batch shards, the shard ids this process's devices hold)."""
  sharding = batch_sharding(mesh, rules)
  total = math.prod(mesh.shape[axis] for axis in batch_axes(rules))
  index_map = sharding.devices_indices_map((total,))
  local = {index_map[d][0].start or 0 for d in mesh.devices.flat if d.process_index == jax.process_index()}
  return total, sorted(local)


def _shard_summary(mesh, rules, total):
  axes = batch_axes(rules)
  sizes = "×".join(str(mesh.shape[a]) for a in axes) or "1"
  return f"mesh axes {axes} of sizes {sizes} = {total} batch shards"


def _check_global_batch(global_batch, mesh, rules, total):
  if global_batch <= 0 or global_batch % total:
    raise ConfigError(f"config.data.global_batch={global_batch} does not split over the "
                      f"{_shard_summary(mesh, rules, total)}: use a multiple of {total}")


def process_batch_size(global_batch, mesh, rules):
  """Rows this process must feed for a global batch of `global_batch` rows (config.data.global_batch)."""
  total, local = _batch_shards(mesh, rules)
  _check_global_batch(global_batch, mesh, rules, total)
  return global_batch // total * len(local)


def make_global_batch(local_batch, mesh, rules):
  """dict of host-local numpy arrays (this process's rows) → dict of global jax.Arrays sharded on dim 0."""
  rows = {name: np.shape(array)[0] if np.ndim(array) else None for name, array in local_batch.items()}
  if not rows:
    raise DataError("make_global_batch: the local batch has no arrays")
  if None in rows.values() or len(set(rows.values())) != 1:
    raise DataError(f"local batch arrays must share a leading batch dimension, got rows {rows}")
  local_rows = next(iter(rows.values()))
  total, local = _batch_shards(mesh, rules)
  if not local:
    raise ConfigError(f"make_global_batch: process {jax.process_index()} holds no device of the mesh")
  if local_rows % len(local):
    raise ConfigError(
        f"config.data.global_batch: process {jax.process_index()} of {jax.process_count()} got a local "
        f"batch of {local_rows} rows, which does not split over its {len(local)} batch shards "
        f"({_shard_summary(mesh, rules, total)} over {jax.process_count()} process(es)); the global "
        f"batch must be a multiple of {total}")
  global_rows = local_rows // len(local) * total
  sharding = batch_sharding(mesh, rules)
  return {name: jax.make_array_from_process_local_data(
              sharding, np.asarray(array), (global_rows,) + np.shape(array)[1:])
          for name, array in local_batch.items()}


def abstract_global_batch(global_shapes, mesh, rules):
  """{name: (shape, dtype) or ShapeDtypeStruct} of the *global* batch → batch-sharded ShapeDtypeStructs."""
  sharding = batch_sharding(mesh, rules)
  total = math.prod(mesh.shape[axis] for axis in batch_axes(rules))
  abstract = {}
  for name, spec in global_shapes.items():
    shape, dtype = (spec.shape, spec.dtype) if hasattr(spec, "shape") else spec
    _check_global_batch(shape[0], mesh, rules, total)
    abstract[name] = jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)
  return abstract


def format_bytes(n):
  """Bytes in binary units: '512 B', '12.50 MiB'."""
  sign, n = ("-" if n < 0 else ""), abs(n)
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if n < 1024 or unit == "TiB":
      return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.2f} {unit}"
    n /= 1024


def sharding_report(tree, shardings=None, *, replicated_warning_bytes=16 << 20):
  """A table of every array leaf: path, shape, dtype, partition spec, bytes per device, total bytes.

  `tree` holds jax.Arrays or ShapeDtypeStructs; `shardings` defaults to each leaf's `.sharding`.
  Logs a warning naming fully replicated leaves larger than `replicated_warning_bytes` (on a mesh
  of more than one device), since they cost their full size on every device.
  """
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  if shardings is None:
    sharding_leaves = [leaf.sharding for _, leaf in leaves]
  else:
    sharding_leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  if len(sharding_leaves) != len(leaves):
    raise ValueError(f"sharding_report: {len(leaves)} arrays but {len(sharding_leaves)} shardings")
  rows, per_device_total, global_total, replicated = [], 0, 0, []
  for (path, leaf), sharding in zip(leaves, sharding_leaves):
    itemsize = np.dtype(leaf.dtype).itemsize
    total = math.prod(leaf.shape) * itemsize
    per_device = math.prod(sharding.shard_shape(leaf.shape)) * itemsize
    spec = sharding.spec if isinstance(sharding, NamedSharding) else type(sharding).__name__
    name = rules_lib.path_str(path)
    rows.append((name, str(tuple(leaf.shape)), str(np.dtype(leaf.dtype)), str(spec),
                 format_bytes(per_device), format_bytes(total)))
    per_device_total += per_device
    global_total += total
    if len(sharding.device_set) > 1 and sharding.is_fully_replicated and total > replicated_warning_bytes:
      replicated.append(f"{name} ({format_bytes(total)})")
  rows.append((f"total ({len(leaves)} arrays)", "", "", "", format_bytes(per_device_total),
               format_bytes(global_total)))
  header = ("path", "shape", "dtype", "partition spec", "per device", "total")
  widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
  lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header] + rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  if replicated and jax.process_index() == 0:
    logging.warning("%d fully replicated arrays larger than %s (each costs its full size on every "
                    "device; check the logical annotations and config.logical_axis_rules): %s",
                    len(replicated), format_bytes(replicated_warning_bytes), ", ".join(replicated))
  return "\n".join(lines)
