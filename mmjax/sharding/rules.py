"""Logical axis rules (`config.logical_axis_rules`) → mesh PartitionSpecs and NamedShardings.

Models annotate parameters with `nn.with_logical_partitioning` and activations with
`nn.with_logical_constraint`; the rules map those logical names onto mesh axes with flax's
priority semantics (first matching rule whose mesh axes are still free wins).
"""

import contextlib
import math

import flax.linen as nn
import jax
from flax.core import meta
from jax.sharding import NamedSharding, PartitionSpec

from mmjax.errors import ConfigError

RULES_FIELD = "config.logical_axis_rules"


def mesh_axes_of(target):
  """A rule's right-hand side as a tuple of mesh axis names (None → ())."""
  if target is None:
    return ()
  return (target,) if isinstance(target, str) else tuple(target)


def normalize_rules(rules):
  """Rules as a tuple of (logical_name, mesh_axis | tuple of mesh axes | None); lists become tuples."""
  if not isinstance(rules, (tuple, list)):
    raise ConfigError(f"{RULES_FIELD}: expected a tuple of (logical_name, mesh_axes) pairs, got {rules!r}")
  normalized = []
  for i, rule in enumerate(rules):
    if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
      raise ConfigError(f"{RULES_FIELD}[{i}]={rule!r}: expected a (logical_name, mesh_axes) pair")
    name, target = rule
    if target is not None and not isinstance(target, str):
      if not isinstance(target, (tuple, list)) or not all(isinstance(a, str) for a in target):
        raise ConfigError(f"{RULES_FIELD}[{i}]: the {name!r} rule maps to {target!r}; expected a mesh "
                          "axis name, a tuple of them, or None")
      target = tuple(target)
    normalized.append((name, target))
  return tuple(normalized)


def validate_rules(rules, mesh):
  """Normalizes the rules and checks every mesh axis they name exists in `mesh`."""
  rules = normalize_rules(rules)
  for name, target in rules:
    for axis in mesh_axes_of(target):
      if axis not in mesh.axis_names:
        raise ConfigError(f"{RULES_FIELD}: the {name!r} rule maps to mesh axis {axis!r}, which is not "
                          f"one of the mesh axes {tuple(mesh.axis_names)}")
  return rules


def logical_to_mesh_spec(logical_spec, rules):
  """A logical PartitionSpec / tuple of logical names → the mesh PartitionSpec the rules give."""
  return nn.logical_to_mesh_axes(tuple(logical_spec), normalize_rules(rules))


def _is_box(x):
  return isinstance(x, meta.AxisMetadata)


def logical_specs(tree):
  """Logical PartitionSpecs for a (possibly flax-boxed) tree; unannotated arrays get P() (replicated)."""
  return nn.get_partition_spec(tree)


def logical_to_shardings(tree, mesh, rules):
  """NamedShardings for a tree of flax boxes, logical PartitionSpecs or plain arrays (replicated)."""
  rules = validate_rules(rules, mesh)
  specs = jax.tree.map(lambda x: x if isinstance(x, PartitionSpec) else logical_specs(x), tree,
                       is_leaf=lambda x: _is_box(x) or isinstance(x, PartitionSpec))
  return jax.tree.map(lambda spec: NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(spec), rules)),
                      specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def path_str(path):
  """A tree path as 'params/blocks/attn/query/kernel'."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _mesh_fields(axes):
  return " / ".join(f"config.mesh.ici.{axis}" for axis in axes)


def check_divisible(tree, mesh, rules):
  """Raises ConfigError for the first annotated leaf whose sharded dimension the mesh cannot split.

  The message names the leaf's path, shape, logical axis, mesh axes and sizes, and the config
  fields that would fix it; the count of other failing leaves follows.
  """
  rules = validate_rules(rules, mesh)
  problems = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_box):
    if not _is_box(leaf) or not hasattr(leaf.value, "shape"):
      continue
    names = tuple(leaf.get_partition_spec())
    shape = leaf.value.shape
    mesh_spec = nn.logical_to_mesh_axes(names, rules)
    for dim, (name, target) in enumerate(zip(names, mesh_spec)):
      axes = mesh_axes_of(target)
      ways = math.prod(mesh.shape[axis] for axis in axes)
      if ways > 1 and shape[dim] % ways:
        if len(axes) == 1:
          where = f"mesh axis {axes[0]!r} of size {ways}"
        else:
          sizes = "×".join(str(mesh.shape[axis]) for axis in axes)
          where = f"mesh axes {axes} of sizes {sizes}={ways}"
        problems.append(f"{path_str(path)} dim {dim} ({name}={shape[dim]}) is not divisible by {where}: "
                        f"change {_mesh_fields(axes)} or the {name!r} rule in {RULES_FIELD}")
  if problems:
    more = f" (and {len(problems) - 1} more leaves)" if len(problems) > 1 else ""
    raise ConfigError(problems[0] + more)


@contextlib.contextmanager
def mesh_and_rules(mesh, rules):
  """Enters `jax.set_mesh(mesh)` and flax's logical axis rules, so `nn.with_logical_constraint` binds."""
  rules = validate_rules(rules, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield
