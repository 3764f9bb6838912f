"""Sharded state creation: a real TrainState with AdamW lands with exactly the specs the rules imply."""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state
from jax.sharding import PartitionSpec as P

from mmjax import sharding
from mmjax.configs import common
from mmjax.errors import ConfigError

RULES = common.DEFAULT_LOGICAL_AXIS_RULES
EMBED, MLP_WIDTH, BATCH = 16, 32, 8


class MLP(nn.Module):
  mlp: int = MLP_WIDTH
  extra_unannotated: int = 0

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.lecun_normal()
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_embed"))
    h = nn.Dense(self.mlp, kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)), name="up")(x)
    h = nn.with_logical_constraint(nn.relu(h), ("activation_batch", "activation_mlp"))
    y = nn.Dense(x.shape[-1], use_bias=False, name="down",
                 kernel_init=nn.with_logical_partitioning(init, ("mlp", "embed")))(h)
    if self.extra_unannotated:  # a parameter someone forgot to annotate
      y = y + nn.Dense(x.shape[-1], use_bias=False, name="plain")(
          jnp.zeros((x.shape[0], self.extra_unannotated)))
    return y


def make_init(model):
  def init(rng):
    variables = model.init(rng, jnp.zeros((BATCH, EMBED)))
    return train_state.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                         tx=optax.adamw(1e-2))
  return init


@pytest.fixture(scope="module")
def mesh():
  return sharding.create_mesh(common.mesh_config(data=2, fsdp=2, tensor=2))


@pytest.fixture(scope="module")
def created(mesh):
  return sharding.create_sharded_state(make_init(MLP()), mesh, RULES, jax.random.key(0))


EXPECTED_PARAM_SPECS = {  # written out from DEFAULT_LOGICAL_AXIS_RULES: embed→fsdp, mlp→tensor
    "up": {"kernel": P("fsdp", "tensor"), "bias": P("tensor")},
    "down": {"kernel": P("tensor", "fsdp")},
}


def test_params_and_adam_moments_get_the_rule_specs(created):
  state, shardings = created
  adam = state.opt_state[0]
  assert isinstance(adam, optax.ScaleByAdamState)
  for tree in (state.params, adam.mu, adam.nu, shardings.params):
    specs = jax.tree.map(lambda x: x.spec if isinstance(x, jax.sharding.NamedSharding) else x.sharding.spec,
                         tree, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
    assert specs == EXPECTED_PARAM_SPECS
  # Unannotated leaves (step counts) are replicated plain arrays.
  assert state.step.sharding.spec == P() and adam.count.sharding.spec == P()
  assert state.params["up"]["kernel"].addressable_shards[0].data.shape == (EMBED // 2, MLP_WIDTH // 2)
  assert not any(isinstance(x, nn.Partitioned) for x in
                 jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nn.Partitioned)))


def test_sharded_init_has_the_same_values_as_a_plain_init(created):
  state, _ = created
  plain = nn.unbox(MLP().init(jax.random.key(0), jnp.zeros((BATCH, EMBED)))["params"])
  for path, value in jax.tree_util.tree_leaves_with_path(plain):
    sharded = state.params
    for key in path:
      sharded = sharded[key.key]
    np.testing.assert_array_equal(np.asarray(sharded), np.asarray(value))


def test_abstract_state_matches_the_real_one(mesh, created):
  state, shardings = created
  abstract, abstract_shardings = sharding.abstract_sharded_state(make_init(MLP()), mesh, RULES,
                                                                 jax.random.key(0))
  describe = lambda tree: [(jax.tree_util.keystr(path), a.shape, a.dtype, a.sharding.spec)
                          for path, a in jax.tree_util.tree_leaves_with_path(tree)]
  assert all(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(abstract))
  assert describe(abstract) == describe(state)
  assert jax.tree.leaves(abstract_shardings) == jax.tree.leaves(shardings)


def test_train_step_keeps_shardings_and_learns(mesh, created):
  state, shardings = created
  state = jax.tree.map(jnp.copy, state)  # the module fixture's arrays must survive donation
  batch_sharding = sharding.batch_sharding(mesh, RULES)

  def train_step(state, batch):
    def loss_fn(params):
      return jnp.mean((state.apply_fn({"params": params}, batch["x"]) - batch["y"]) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  step = jax.jit(train_step, in_shardings=(shardings, batch_sharding),
                 out_shardings=(shardings, None), donate_argnums=0)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(BATCH, EMBED)).astype(np.float32)
  batch = sharding.make_global_batch({"x": x, "y": np.tanh(x[:, ::-1]).copy()}, mesh, RULES)
  losses = []
  with sharding.mesh_and_rules(mesh, RULES):
    for _ in range(20):
      old = state
      state, loss = step(state, batch)
      losses.append(float(loss))
  assert old.params["up"]["kernel"].is_deleted()  # donated
  assert int(state.step) == 20
  assert losses[-1] < 0.5 * losses[0], losses
  assert state.params["down"]["kernel"].sharding.spec == P("tensor", "fsdp")
  assert state.opt_state[0].nu["up"]["bias"].sharding.spec == P("tensor")


def test_indivisible_state_names_the_first_leaf_and_counts_the_rest(mesh):
  with pytest.raises(ConfigError) as e:
    sharding.create_sharded_state(make_init(MLP(mlp=31)), mesh, RULES, jax.random.key(0))
  # down/kernel, up/kernel and up/bias, each in params, Adam's mu and nu: 9 leaves, first one named.
  assert str(e.value) == ("params/down/kernel dim 0 (mlp=31) is not divisible by mesh axis 'tensor' of "
                          "size 2: change config.mesh.ici.tensor or the 'mlp' rule in "
                          "config.logical_axis_rules (and 8 more leaves)")


def test_sharding_report_and_replicated_warning(mesh, caplog):
  state, shardings = sharding.create_sharded_state(make_init(MLP(extra_unannotated=64)), mesh, RULES,
                                                   jax.random.key(0))
  with caplog.at_level(logging.WARNING):
    report = sharding.sharding_report(state, shardings, replicated_warning_bytes=2048)
  lines = report.splitlines()
  assert lines[0].split() == ["path", "shape", "dtype", "partition", "spec", "per", "device", "total"]
  up_kernel = next(line for line in lines if line.startswith("params/up/kernel"))
  # (16, 32) float32 = 2 KiB in all, split 2 (fsdp) × 2 (tensor) ways.
  assert up_kernel.split() == ["params/up/kernel", "(16,", "32)", "float32", "P('fsdp',", "'tensor')",
                               "512", "B", "2.00", "KiB"]
  leaves = jax.tree.leaves(state)
  total_bytes = sum(x.nbytes for x in leaves)
  per_device = sum(x.addressable_shards[0].data.nbytes for x in leaves)
  assert lines[-1].split() == ["total", f"({len(leaves)}", "arrays)",
                               *sharding.format_bytes(per_device).split(),
                               *sharding.format_bytes(total_bytes).split()]
  # plain/kernel is (64, 16) float32 = 4 KiB, replicated: warned about (params, mu and nu).
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "3 fully replicated arrays" in warnings[0], warnings
  assert "params/plain/kernel (4.00 KiB)" in warnings[0]
  assert "params/up/kernel" not in warnings[0]
