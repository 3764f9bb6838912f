"""A test-only trainer: a two-layer MLP regression step with logical annotations and AdamW.

`config.trainer = "tests.tools.aot_fixture"` lets `mmjax.tools.aot` compile it like a real trainer.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from mmjax import sharding

# The two int32 step counters (TrainState.step, Adam's count) may each be padded to a TPU tile,
# so compiled argument sizes may exceed the array bytes by up to this much.
SCALAR_SLACK = 2 * 1024


class MLP(nn.Module):
  embed: int = 128
  mlp: int = 256

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.lecun_normal()
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_embed"))
    up = nn.with_logical_partitioning(init, ("embed", "mlp"))
    down = nn.with_logical_partitioning(init, ("mlp", "embed"))
    h = nn.Dense(self.mlp, use_bias=False, kernel_init=up)(x)
    h = nn.with_logical_constraint(nn.gelu(h), ("activation_batch", "activation_mlp"))
    return nn.Dense(self.embed, use_bias=False, kernel_init=down)(h)


def create_state(config, rng):
  model = MLP(config.model.embed, config.model.mlp)
  variables = model.init(rng, jnp.zeros((1, config.model.embed), jnp.float32))
  return train_state.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                       tx=optax.adamw(config.learning_rate))


def train_step(state, batch):
  def loss_fn(params):
    prediction = state.apply_fn({"params": params}, batch["inputs"])
    return jnp.mean((prediction - batch["targets"]) ** 2)
  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), {"loss": loss}


def batch_shapes(config):
  shape = (config.data.global_batch, config.model.embed)
  return {"inputs": (shape, jnp.float32), "targets": (shape, jnp.float32)}


def jit_train_step(state_shardings, mesh, rules):
  return jax.jit(train_step, in_shardings=(state_shardings, sharding.batch_sharding(mesh, rules)),
                 out_shardings=(state_shardings, None), donate_argnums=0)


def aot_train_step(config, mesh):
  rules = config.logical_axis_rules
  state, state_shardings = sharding.abstract_sharded_state(
      functools.partial(create_state, config), mesh, rules, jax.random.key(config.seed))
  batch = sharding.abstract_global_batch(batch_shapes(config), mesh, rules)
  return jit_train_step(state_shardings, mesh, rules), (state, batch)


def expected_argument_bytes(config, param_ways, batch_ways):
  """Per-device bytes of the step's arrays, by hand: params + Adam mu + nu, then inputs + targets."""
  kernels = 2 * config.model.embed * config.model.mlp * 4  # two f32 kernels
  batch = 2 * config.data.global_batch * config.model.embed * 4
  return 3 * kernels // param_ways + batch // batch_ways
