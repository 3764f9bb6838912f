"""Logical axis rules → PartitionSpecs / NamedShardings, rule validation, and the divisibility check."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from mmjax import sharding
from mmjax.configs import common
from mmjax.errors import ConfigError

RULES = common.DEFAULT_LOGICAL_AXIS_RULES


@pytest.fixture(scope="module")
def mesh():
  return sharding.create_mesh(common.mesh_config(data=1, fsdp=2, tensor=4))


@pytest.mark.parametrize("logical, expected", [
    (("embed", "mlp"), P("fsdp", "tensor")),
    (("mlp", "embed"), P("tensor", "fsdp")),
    (("embed", "heads", "kv"), P("fsdp", "tensor", None)),
    (("layers", "embed", "mlp"), P(None, "fsdp", "tensor")),
    (("activation_batch", "activation_length", "activation_embed"), P(("data", "fsdp"), None, None)),
    # A mesh axis is used once per array, by the earliest rule: 'mlp' takes 'tensor' before 'heads'.
    (("heads", "mlp"), P(None, "tensor")),
    # Names without a rule are replicated.
    (("embed", "no_such_axis"), P("fsdp", None)),
    ((None, "vocab"), P(None, "tensor")),
])
def test_logical_to_mesh_spec(logical, expected):
  assert sharding.logical_to_mesh_spec(P(*logical), RULES) == expected


def test_rules_from_a_config_override_may_use_lists():
  rules = [["embed", ["fsdp", "tensor"]], ["mlp", None]]
  assert sharding.normalize_rules(rules) == (("embed", ("fsdp", "tensor")), ("mlp", None))
  assert sharding.logical_to_mesh_spec(("embed", "mlp"), rules) == P(("fsdp", "tensor"), None)


@pytest.mark.parametrize("rules, fragment", [
    ((("embed", "model"),), "mesh axis 'model'"),
    ((("embed", ("fsdp", "pipeline")),), "mesh axis 'pipeline'"),
    ((("embed",),), "config.logical_axis_rules[0]"),
    ((("embed", 3),), "the 'embed' rule maps to 3"),
    ("embed=fsdp", "config.logical_axis_rules"),
])
def test_bad_rules_name_the_config_field(mesh, rules, fragment):
  with pytest.raises(ConfigError) as e:
    sharding.validate_rules(rules, mesh)
  assert "config.logical_axis_rules" in str(e.value) and fragment in str(e.value)


class Attention(nn.Module):
  heads: int = 8
  head_dim: int = 4

  @nn.compact
  def __call__(self, x):
    init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "heads", "kv"))
    return nn.DenseGeneral((self.heads, self.head_dim), kernel_init=init, use_bias=False, name="query")(x)


class Blocks(nn.Module):
  heads: int = 8

  @nn.compact
  def __call__(self, x):
    return Attention(self.heads, name="attn")(x)


def _abstract_params(heads, embed=16):
  return jax.eval_shape(Blocks(heads).init, jax.random.key(0), jnp.zeros((2, embed)))


def test_boxed_tree_to_named_shardings(mesh):
  boxed = _abstract_params(heads=8)
  shardings = sharding.logical_to_shardings(boxed, mesh, RULES)
  kernel = shardings["params"]["attn"]["query"]["kernel"]
  assert isinstance(kernel, jax.sharding.NamedSharding) and kernel.mesh is mesh
  assert kernel.spec == P("fsdp", "tensor", None)
  assert sharding.logical_specs(boxed)["params"]["attn"]["query"]["kernel"] == P("embed", "heads", "kv")
  # A plain array (no annotation) is replicated.
  plain = sharding.logical_to_shardings({"count": jax.ShapeDtypeStruct((), jnp.int32)}, mesh, RULES)
  assert plain["count"].spec == P()


def test_divisible_shapes_pass(mesh):
  sharding.check_divisible(_abstract_params(heads=8), mesh, RULES)


def test_dalle_62_heads_fail_early_with_the_fields_to_change(mesh):
  with pytest.raises(ConfigError) as e:
    sharding.check_divisible(_abstract_params(heads=62), mesh, RULES)
  assert str(e.value) == (
      "params/attn/query/kernel dim 1 (heads=62) is not divisible by mesh axis 'tensor' of size 4: "
      "change config.mesh.ici.tensor or the 'heads' rule in config.logical_axis_rules")


def test_indivisible_over_several_mesh_axes_counts_the_other_leaves(mesh):
  rules = (("embed", ("fsdp", "tensor")),) + RULES
  with pytest.raises(ConfigError) as e:
    sharding.check_divisible({"a": _abstract_params(heads=8, embed=12), "b": _abstract_params(8, 4)},
                             mesh, rules)
  message = str(e.value)
  assert message.startswith("a/params/attn/query/kernel dim 0 (embed=12) is not divisible by mesh axes "
                            "('fsdp', 'tensor') of sizes 2×4=8: change config.mesh.ici.fsdp / "
                            "config.mesh.ici.tensor or the 'embed' rule")
  assert message.endswith("(and 1 more leaves)")


def test_mesh_and_rules_bind_logical_constraints():
  def f(x):
    return nn.with_logical_constraint(x * 2, ("activation_batch", "activation_mlp"))

  mesh = sharding.create_mesh(common.mesh_config(data=2, fsdp=2, tensor=2))
  x = jnp.ones((4, 8))
  with sharding.mesh_and_rules(mesh, RULES):
    y = jax.jit(f)(x)
  assert y.sharding.spec == P(("data", "fsdp"), "tensor")
