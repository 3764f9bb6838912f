"""Gradient accumulation shared by the trainers: a batch split into microbatches, their gradients
summed by a `lax.scan` (one microbatch's activations live at a time), the mean returned.

Config fields (each trainer's config carries them):
  accumulation_steps    microbatches per update; 0 = as many as keep `microbatch_per_shard` rows
                        on each batch shard (so one config serves any slice size)
  microbatch_per_shard  rows per batch shard per microbatch, used when accumulation_steps = 0
  accumulation_dtype    the running sum: "float32" or "bfloat16" (half the HBM, ~1% rounding)

Equal microbatches and a per-example mean loss make the mean of the microbatch gradients the
whole batch's gradient, up to rounding.
"""

import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from mmjax import sharding
from mmjax.errors import ConfigError

DTYPES = ("float32", "bfloat16")


def check_config(config):
  """ConfigError naming the first accumulation field that cannot work."""
  if config.accumulation_steps < 0:
    raise ConfigError(f"config.accumulation_steps: must be >= 1, or 0 (from microbatch_per_shard), got "
                      f"{config.accumulation_steps}")
  if not config.accumulation_steps and config.microbatch_per_shard <= 0:
    raise ConfigError(f"config.microbatch_per_shard: must be positive when config.accumulation_steps=0, got "
                      f"{config.microbatch_per_shard}")
  if config.accumulation_dtype not in DTYPES:
    raise ConfigError(f"config.accumulation_dtype: expected 'float32' or 'bfloat16', got "
                      f"{config.accumulation_dtype!r}")


def accumulation_steps(config, mesh):
  """Microbatches per update: config.accumulation_steps, or with 0 as many as keep
  config.microbatch_per_shard rows on each batch shard (so one config serves any slice size)."""
  batch = config.data.global_batch
  shards = math.prod(mesh.shape[axis] for axis in sharding.batch_axes(config.logical_axis_rules))
  steps = config.accumulation_steps
  if not steps:
    rows = config.microbatch_per_shard * shards
    if batch % rows:
      raise ConfigError(f"config.microbatch_per_shard={config.microbatch_per_shard}: microbatches of "
                        f"{config.microbatch_per_shard} rows × {shards} batch shards = {rows} rows do not "
                        f"divide config.data.global_batch={batch}")
    steps = batch // rows
  if batch % steps or (batch // steps) % shards:
    raise ConfigError(f"config.accumulation_steps={steps}: config.data.global_batch={batch} does not split into "
                      f"{steps} microbatches of a multiple of the {shards} batch shards; use a global batch "
                      f"that is a multiple of {steps * shards}")
  return steps


def to_microbatches(x, steps, sharding_):
  """[B, ...] → [steps, B/steps, ...]; microbatch m holds rows m, m + steps, …, so with the batch split
  in contiguous blocks over the devices every microbatch is spread over all of them (no data moves)."""
  x = x.reshape(x.shape[0] // steps, steps, *x.shape[1:]).swapaxes(0, 1)
  return jax.lax.with_sharding_constraint(x, sharding_)


def microbatch_rows(index, steps, rows):
  """Global batch rows of microbatch `index` (of `rows` rows), in `to_microbatches`' order."""
  return index + steps * jnp.arange(rows)


def mean_gradients(grad_fn, params, batch, *, steps, mesh, rules, param_shardings, dtype):
  """(mean of the microbatch gradients in the params' dtypes, aux stacked over microbatches).

  grad_fn(microbatch, index) → (aux, grads) with grads shaped like `params`; `index` is the
  microbatch's number (an int32 scalar; 0 when steps = 1). The running sum is sharded like the
  params and kept in `dtype`. Every aux leaf gains a leading [steps] axis (also when steps = 1).
  """
  if steps == 1:
    aux, grads = grad_fn(batch, jnp.int32(0))
    return (jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params),
            jax.tree.map(lambda a: jnp.expand_dims(a, 0), aux))
  axes = sharding.batch_axes(rules)
  micro = NamedSharding(mesh, PartitionSpec(None, axes or None))
  microbatches = jax.tree.map(lambda v: to_microbatches(v, steps, micro), batch)
  dtype = jnp.dtype(dtype)

  def accumulate(total, indexed):
    index, microbatch = indexed
    aux, grads = grad_fn(microbatch, index)
    total = jax.tree.map(lambda t, g: t + g.astype(dtype), total, grads)
    return jax.lax.with_sharding_constraint(total, param_shardings), aux

  zeros = jax.lax.with_sharding_constraint(jax.tree.map(lambda p: jnp.zeros(p.shape, dtype), params),
                                           param_shardings)
  total, aux = jax.lax.scan(accumulate, zeros, (jnp.arange(steps, dtype=jnp.int32), microbatches))
  grads = jax.tree.map(lambda t, p: (t.astype(jnp.float32) / steps).astype(p.dtype), total, params)
  return grads, aux
