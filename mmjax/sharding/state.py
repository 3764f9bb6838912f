"""Train state created already sharded: eval_shape → shardings from logical annotations → jit(init).

    state, state_shardings = create_sharded_state(init_fn, mesh, config.logical_axis_rules, rng)
    step = jax.jit(train_step, in_shardings=(state_shardings, batch_sharding(mesh, rules)),
                   out_shardings=(state_shardings, None), donate_argnums=0)

`init_fn` should build the optimizer state from the *boxed* params (e.g.
`TrainState.create(params=variables["params"], tx=optax.adamw(...))`): optax maps over the boxes,
so moments inherit the params' logical annotations. Un-annotated leaves (step counts) are replicated.
"""

import jax
from flax.core import meta

from mmjax.sharding import rules as rules_lib


def unbox(tree):
  """The tree with every flax Partitioned/LogicallyPartitioned box replaced by its value (no constraint)."""
  return jax.tree.map(lambda x: x.value if isinstance(x, meta.Partitioned) else meta.unbox(x), tree,
                      is_leaf=lambda x: isinstance(x, meta.AxisMetadata))


def abstract_sharded_state(init_fn, mesh, rules, *args):
  """(abstract state, shardings) without allocating: ShapeDtypeStructs carrying their NamedShardings.

  Checks the rules against the mesh and every sharded dimension for divisibility (ConfigError).
  The abstract state is what `jax.jit(step).lower(...)` needs for AOT compilation.
  """
  rules = rules_lib.validate_rules(rules, mesh)
  with rules_lib.mesh_and_rules(mesh, rules):
    boxed = jax.eval_shape(init_fn, *args)
  rules_lib.check_divisible(boxed, mesh, rules)
  shardings = rules_lib.logical_to_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          unbox(boxed), shardings)
  return abstract, shardings


def create_sharded_state(init_fn, mesh, rules, *args):
  """Runs `init_fn(*args)` under jit so every array is created directly with its sharding.

  Returns (state, shardings): the state with flax boxes removed (plain jax.Arrays) and the
  NamedSharding tree of the same structure, ready for `jax.jit(..., in_shardings=...)`.
  """
  abstract, shardings = abstract_sharded_state(init_fn, mesh, rules, *args)
  # jit returns flat leaves: static fields (an optax tx built inside init_fn) differ between calls,
  # so the state is rebuilt on the abstract state's treedef, which `shardings` shares.
  init_leaves = jax.jit(lambda *a: jax.tree.leaves(unbox(init_fn(*a))),
                        out_shardings=jax.tree.leaves(shardings))
  with rules_lib.mesh_and_rules(mesh, rules):
    leaves = init_leaves(*args)
  return jax.tree.unflatten(jax.tree.structure(abstract), leaves), shardings
