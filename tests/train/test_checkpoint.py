import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.errors import DataError
from mmjax.train import checkpoint


def _params():
  return {"conv": {"kernel": jnp.arange(24.0).reshape(2, 3, 4), "bias": jnp.ones(4)}}


def test_exported_model_round_trips(tmp_path):
  params = _params()
  checkpoint.save_model(tmp_path / "m", params, {"kind": "dvae", "n_hid": 8})
  restored, model_config = checkpoint.load_model(tmp_path / "m", kind="dvae")
  assert model_config == {"kind": "dvae", "n_hid": 8}
  jax.tree.map(np.testing.assert_array_equal, restored, params)


def test_restore_into_shardings(tmp_path):
  params = _params()
  checkpoint.save_model(tmp_path / "m", params, {"kind": "dvae"})
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, None, "fsdp"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract = {"conv": {"kernel": jax.ShapeDtypeStruct((2, 3, 4), jnp.float32, sharding=sharding),
                       "bias": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=replicated)}}
  # 4 does not split 8 ways: refused before anything is read, naming the leaf.
  with pytest.raises(DataError, match=r"cannot restore \['conv'\]\['kernel'\] of shape \(2, 3, 4\)"):
    checkpoint.load_model(tmp_path / "m", abstract_params=abstract)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, None, None))
  abstract["conv"]["kernel"] = jax.ShapeDtypeStruct((2, 3, 4), jnp.float32, sharding=sharding)
  restored, _ = checkpoint.load_model(tmp_path / "m", abstract_params=abstract)
  assert restored["conv"]["kernel"].sharding == sharding


def test_missing_or_wrong_model_is_named(tmp_path):
  with pytest.raises(DataError, match="not an exported mmjax model"):
    checkpoint.load_model(tmp_path / "nothing")
  checkpoint.save_model(tmp_path / "m", _params(), {"kind": "clip"})
  with pytest.raises(DataError, match="expected 'dvae'"):
    checkpoint.load_model(tmp_path / "m", kind="dvae")


def test_train_checkpoints_resume_latest(tmp_path):
  ckpts = checkpoint.TrainCheckpoints(tmp_path, max_to_keep=2)
  assert ckpts.restore({"w": jnp.zeros(3)}) == (None, 0)
  for step in (1, 2, 3):
    ckpts.save(step, {"w": jnp.full(3, float(step))})
  ckpts.wait()
  state, step = checkpoint.TrainCheckpoints(tmp_path).restore({"w": jnp.zeros(3)})
  assert step == 3
  np.testing.assert_array_equal(state["w"], [3.0, 3.0, 3.0])
  assert sorted(ckpts.manager.all_steps()) == [2, 3]


def test_train_state_that_cannot_be_sharded_is_named(tmp_path):
  ckpts = checkpoint.TrainCheckpoints(tmp_path)
  ckpts.save(1, {"w": jnp.zeros(4)})
  ckpts.wait()
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  with pytest.raises(DataError, match=r"checkpoints/1: cannot restore \['w'\] of shape \(4,\)"):
    ckpts.restore({"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=split)})
