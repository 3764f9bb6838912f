import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from mmjax import sharding
from mmjax.configs import common
from mmjax.train import state as state_lib


class _Tiny(nn.Module):

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.ones, ("embed", "mlp")), (4, 8))
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)), (8,))
    return x @ kernel + bias


def _optimizer_config(weight_decay):
  return ml_collections.ConfigDict({"b1": 0.9, "b2": 0.95, "weight_decay": weight_decay, "grad_clip_norm": 1.0})


def _init(rng, weight_decay=0.5, ema_decay=0.9):
  model = _Tiny()
  params = model.init(rng, jnp.zeros((1, 4)))["params"]
  return state_lib.TrainState.create(apply_fn=model.apply, params=params,
                                     tx=state_lib.adamw(0.1, _optimizer_config(weight_decay)),
                                     ema_decay=ema_decay)


def test_ema_follows_params_and_bias_is_not_decayed():
  mesh = sharding.create_mesh(common.mesh_config(data=1, fsdp=4, tensor=2))
  rules = common.DEFAULT_LOGICAL_AXIS_RULES
  state, shardings = sharding.create_sharded_state(_init, mesh, rules, jax.random.key(0))
  assert state.ema_params["kernel"].sharding.spec == shardings.params["kernel"].spec
  assert state.ema_params["kernel"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  zero_grads = jax.tree.map(jnp.zeros_like, state.params)
  new = state.apply_gradients(grads=zero_grads)
  # Zero gradients: AdamW's decoupled weight decay shrinks the kernel, never the bias.
  np.testing.assert_allclose(new.params["kernel"], 1.0 - 0.1 * 0.5, rtol=1e-6)
  np.testing.assert_array_equal(new.params["bias"], 0.0)
  # EMA = 0.9 * old + 0.1 * new.
  np.testing.assert_allclose(new.ema_params["kernel"], 0.9 * 1.0 + 0.1 * (1.0 - 0.05), rtol=1e-6)
