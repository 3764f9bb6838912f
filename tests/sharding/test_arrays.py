"""Global batches from host-local numpy data: values, shardings and the errors that name the config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mmjax import sharding
from mmjax.configs import common
from mmjax.errors import ConfigError, DataError

RULES = common.DEFAULT_LOGICAL_AXIS_RULES


@pytest.fixture(scope="module")
def mesh():
  return sharding.create_mesh(common.mesh_config(data=2, fsdp=2, tensor=2))


def _local_batch(rows):
  return {"image": np.arange(rows * 3 * 2, dtype=np.float32).reshape(rows, 3, 2),
          "text": np.arange(rows * 5, dtype=np.int32).reshape(rows, 5) % 7}


def test_batch_axes_and_sharding_follow_the_rules(mesh):
  assert sharding.batch_axes(RULES) == ("data", "fsdp")
  assert sharding.batch_sharding(mesh, RULES).spec == P(("data", "fsdp"))
  data_only = (("activation_batch", "data"),)
  assert sharding.batch_sharding(mesh, data_only).spec == P(("data",))
  assert sharding.batch_sharding(mesh, (("embed", "fsdp"),)).spec == P(None)


def test_global_batch_values_and_sharding(mesh):
  local = _local_batch(8)
  batch = sharding.make_global_batch(local, mesh, RULES)
  assert set(batch) == {"image", "text"}
  for name, array in batch.items():
    assert isinstance(array, jax.Array)
    assert array.shape == local[name].shape and array.dtype == local[name].dtype
    assert array.sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(array), local[name])
  # Each device holds the rows of its (data, fsdp) position; the tensor axis replicates them.
  image = batch["image"]
  positions = {d: idx for idx, d in np.ndenumerate(mesh.devices)}
  for shard in image.addressable_shards:
    data, fsdp, _ = positions[shard.device]
    first = (data * 2 + fsdp) * 2
    np.testing.assert_array_equal(np.asarray(shard.data), local["image"][first:first + 2])
  assert float(jax.jit(jnp.sum)(image)) == float(local["image"].sum())


def test_process_batch_size(mesh):
  assert sharding.process_batch_size(16, mesh, RULES) == 16  # one process holds every shard
  with pytest.raises(ConfigError, match=r"config.data.global_batch=10 does not split over the mesh "
                                        r"axes \('data', 'fsdp'\) of sizes 2×2 = 4 batch shards: use a "
                                        r"multiple of 4"):
    sharding.process_batch_size(10, mesh, RULES)


def test_local_batch_that_does_not_divide(mesh):
  with pytest.raises(ConfigError) as e:
    sharding.make_global_batch(_local_batch(6), mesh, RULES)
  message = str(e.value)
  for fragment in ("config.data.global_batch", "6 rows", "1 process(es)", "sizes 2×2 = 4 batch shards",
                   "multiple of 4"):
    assert fragment in message, message


def test_local_arrays_must_agree_on_rows(mesh):
  with pytest.raises(DataError, match=r"leading batch dimension.*'image': 4, 'text': 8"):
    sharding.make_global_batch({"image": np.zeros((4, 2)), "text": np.zeros((8, 2))}, mesh, RULES)
  with pytest.raises(DataError, match="leading batch dimension"):
    sharding.make_global_batch({"scalar": np.float32(1.0)}, mesh, RULES)


def test_abstract_global_batch(mesh):
  abstract = sharding.abstract_global_batch(
      {"image": ((16, 3, 2), jnp.float32), "text": jax.ShapeDtypeStruct((16, 5), jnp.int32)}, mesh, RULES)
  assert abstract["image"].shape == (16, 3, 2) and abstract["text"].dtype == jnp.int32
  assert abstract["text"].sharding == sharding.batch_sharding(mesh, RULES)
  with pytest.raises(ConfigError, match="config.data.global_batch=10"):
    sharding.abstract_global_batch({"image": ((10, 3), jnp.float32)}, mesh, RULES)
