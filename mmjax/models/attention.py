"""DALL·E's sparse attention masks (row / column / convolutional) and two kernels that apply them.

The transformer's sequence is `text_length` text tokens then a `grid_size`×`grid_size` grid of image
tokens in row-major (raster) order, L = text_length + grid_size². Masks are bool [L, L] over
(query i, key j), True where i may attend to j:

  text query  → text keys   causal (j ≤ i); text never sees image keys
  image query → text keys   all of them
  image query → image keys  by pattern, always causal in raster order (key index ≤ query index):
    "row"     keys in the query's row: the row so far, including the query itself
    "column"  keys in the query's column: the same column in this and every earlier row
    "conv"    keys in the kernel_size×kernel_size window centred on the query (|Δr|, |Δc| ≤ k//2)
              that precede it in raster order: the k//2 rows above (2·(k//2)+1 columns wide), and
              the k//2 keys to the left in the query's own row, plus the query itself

These are the masks of the DALL·E paper (Ramesh et al. 2021, appendix B.1, Fig. 11): row and column
attention alternate through the stack and the last layer uses convolutional attention, 11×11 at full
size. Row and column are taken literally as "same row" / "same column" of the raster grid (the paper's
figure draws the column mask after transposing the image so it is also a band; a transpose changes the
block layout, not which keys a query sees). Every query sees itself, so no row of a mask is empty and
the softmax is always defined.

Layer schedule: layer i (1-based) of n uses "column" when (i − 2) mod 4 = 0, "row" otherwise, and the
last layer uses "conv". A scanned stack carries the per-layer pattern id (`layer_pattern_ids`) and
the attention function selects the mask (dense) or the kernel (splash) from it.

Kernels, behind one `make_attention_fn(kind, ...)` returning `fn(query, key, value, pattern_id)`:
  "dense"   XLA softmax attention with the selected [L, L] mask (CPU, GPU, TPU); compute is L².
  "splash"  TPU splash attention (Pallas): each pattern is a block-sparse mask, so blocks of the
            [L, L] grid that are all False are never computed. `block_counts` says how many are.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from mmjax.models import layers

PATTERNS = ("row", "column", "conv")
KINDS = ("dense", "splash")


def layer_patterns(num_layers):
  """The pattern of each layer (index 0 = layer 1): column when (i − 2) mod 4 = 0, else row; last conv."""
  if num_layers < 1:
    raise ValueError(f"layer_patterns: num_layers={num_layers}, expected ≥ 1")
  patterns = ["column" if (i - 2) % 4 == 0 else "row" for i in range(1, num_layers + 1)]
  patterns[-1] = "conv"
  return tuple(patterns)


def layer_pattern_ids(num_layers):
  """int32 [num_layers]: each layer's index into PATTERNS (what a scanned stack carries)."""
  return np.array([PATTERNS.index(p) for p in layer_patterns(num_layers)], np.int32)


def _check_pattern(pattern):
  if pattern not in PATTERNS:
    raise ValueError(f"attention pattern {pattern!r}: expected one of {PATTERNS}")


def _check_sizes(text_length, grid_size, kernel_size):
  if text_length < 0 or grid_size < 1:
    raise ValueError(f"text_length={text_length}, grid_size={grid_size}: expected ≥ 0 and ≥ 1")
  if kernel_size < 1 or kernel_size % 2 == 0:
    raise ValueError(f"kernel_size={kernel_size}: expected an odd size ≥ 1 (the window is centred)")


def image_mask(pattern, grid_size, kernel_size=11):
  """bool [N, N], N = grid_size²: which image keys each image query sees (raster order)."""
  _check_pattern(pattern)
  _check_sizes(0, grid_size, kernel_size)
  index = np.arange(grid_size * grid_size)
  row, col = index // grid_size, index % grid_size
  causal = index[None, :] <= index[:, None]
  if pattern == "row":
    allowed = row[:, None] == row[None, :]
  elif pattern == "column":
    allowed = col[:, None] == col[None, :]
  else:
    half = kernel_size // 2
    allowed = ((np.abs(row[:, None] - row[None, :]) <= half)
               & (np.abs(col[:, None] - col[None, :]) <= half))
  return allowed & causal


def dalle_mask(pattern, text_length, grid_size, kernel_size=11):
  """bool [L, L], L = text_length + grid_size²: the full text+image mask of one pattern."""
  _check_sizes(text_length, grid_size, kernel_size)
  t = text_length
  length = t + grid_size * grid_size
  mask = np.zeros((length, length), np.bool_)
  mask[:t, :t] = np.tril(np.ones((t, t), np.bool_))
  mask[t:, :t] = True
  mask[t:, t:] = image_mask(pattern, grid_size, kernel_size)
  return mask


def mask_stack(text_length, grid_size, kernel_size=11):
  """bool [3, L, L]: `dalle_mask` of every pattern, in PATTERNS order (index = pattern id)."""
  return np.stack([dalle_mask(p, text_length, grid_size, kernel_size) for p in PATTERNS])


# ----------------------------------------------------------------------------- kernels

def make_attention_fn(kind, text_length, grid_size, kernel_size=11, *, mesh=None, rules=None,
                      block_size=128, interpret=False):
  """`fn(query, key, value, pattern_id) -> [B, L, H, D]` applying the DALL·E mask of `pattern_id`.

  query/key/value [B, L, H, D] with L = text_length + grid_size²; `pattern_id` is an int32 scalar
  (traced or not) indexing PATTERNS, so a scanned layer stack can carry it. Output is in the query's
  dtype; softmax in f32; q is scaled by 1/√D.

  kind="dense": XLA attention with the mask gathered from the constant `mask_stack`.
  kind="splash": TPU splash attention, one block-sparse kernel per pattern chosen with lax.switch,
    inside `jax.shard_map` over the mesh axes that `rules` give `activation_batch` and
    `activation_heads` (`mesh`/`rules` default to the ones in context: `jax.set_mesh`,
    `nn.logical_axis_rules`; without a mesh it runs unsharded). L is padded up to a multiple of
    `block_size` (a multiple of 128); `interpret=True` runs the Pallas kernel on the CPU (slow; tests).
  """
  if kind == "dense":
    return _dense_attention_fn(text_length, grid_size, kernel_size)
  if kind == "splash":
    return _splash_attention_fn(text_length, grid_size, kernel_size, mesh=mesh, rules=rules,
                                block_size=block_size, interpret=interpret)
  raise ValueError(f"attention kind {kind!r}: expected one of {KINDS}")


def _check_inputs(query, key, value, length):
  if query.ndim != 4 or key.shape != query.shape or value.shape != query.shape:
    raise ValueError(f"attention: expected query/key/value of one shape [B, L, H, D], got "
                     f"{query.shape}, {key.shape}, {value.shape}")
  if query.shape[1] != length:
    raise ValueError(f"attention: sequence length {query.shape[1]} != text_length + grid_size² = "
                     f"{length} that the masks were built for")


def _dense_attention_fn(text_length, grid_size, kernel_size):
  masks = mask_stack(text_length, grid_size, kernel_size)

  def attend(query, key, value, pattern_id):
    _check_inputs(query, key, value, masks.shape[-1])
    mask = jax.lax.dynamic_index_in_dim(jnp.asarray(masks), pattern_id, keepdims=False)
    return layers.dot_product_attention(query, key, value, mask=mask[None, None])

  return attend


def _padded_length(length, block_size):
  if block_size % 128:
    raise ValueError(f"splash attention: block_size={block_size} must be a multiple of 128 "
                     "(the TPU lane width)")
  return -(-length // block_size) * block_size


def padded_mask(pattern, text_length, grid_size, kernel_size, block_size):
  """`dalle_mask` padded to a multiple of `block_size`. Padded queries see only themselves, so
  every row is non-empty and real queries never see padded keys: real outputs are exact."""
  mask = dalle_mask(pattern, text_length, grid_size, kernel_size)
  length = mask.shape[0]
  padded = _padded_length(length, block_size)
  out = np.zeros((padded, padded), np.bool_)
  out[:length, :length] = mask
  out[np.arange(length, padded), np.arange(length, padded)] = True
  return out


def _block_sizes(block_size):
  size = dict(block_q=block_size, block_kv=block_size, block_kv_compute=block_size)
  return splash.BlockSizes(**size, block_q_dkv=block_size, block_kv_dkv=block_size,
                           block_kv_dkv_compute=block_size, block_q_dq=block_size,
                           block_kv_dq=block_size)


def _context_mesh_and_rules(mesh, rules):
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
  if rules is None:
    rules = nn.get_logical_axis_rules()
  return mesh, tuple(rules)


def _splash_attention_fn(text_length, grid_size, kernel_size, *, mesh, rules, block_size,
                         interpret):
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  length = text_length + grid_size * grid_size
  padded = _padded_length(length, block_size)
  masks = [splash.NumpyMask(padded_mask(p, text_length, grid_size, kernel_size, block_size))
           for p in PATTERNS]

  @functools.lru_cache(maxsize=None)
  def kernels(local_heads):
    # Every head shares its layer's mask: splash stores the block metadata once per shard.
    return [splash.make_splash_mha(splash.MultiHeadMask((mask,) * local_heads),
                                   block_sizes=_block_sizes(block_size), head_shards=1,
                                   q_seq_shards=1, interpret=interpret)
            for mask in masks]

  def local_attention(query, key, value, pattern_id):
    # [B, L, H, D] → splash's [H, L, D] per example, vmapped over the batch.
    heads, depth = query.shape[2:]
    pad = ((0, 0), (0, padded - length), (0, 0), (0, 0))
    query = query * jnp.asarray(depth ** -0.5, query.dtype)
    q, k, v = (jnp.pad(x, pad).transpose(0, 2, 1, 3) for x in (query, key, value))
    branches = [jax.vmap(kernel) for kernel in kernels(heads)]
    out = jax.lax.switch(pattern_id, branches, q, k, v)
    return out.transpose(0, 2, 1, 3)[:, :length].astype(query.dtype)

  def attend(query, key, value, pattern_id):
    _check_inputs(query, key, value, length)
    pattern_id = jnp.asarray(pattern_id, jnp.int32)
    context_mesh, context_rules = _context_mesh_and_rules(mesh, rules)
    if context_mesh is None or context_mesh.empty or context_mesh.size == 1:
      return local_attention(query, key, value, pattern_id)
    spec = nn.logical_to_mesh_axes(("activation_batch", None, "activation_heads", None),
                                   context_rules)
    _check_shardable(query.shape, spec, context_mesh)
    sharded = jax.shard_map(local_attention, mesh=context_mesh,
                            in_specs=(spec, spec, spec, jax.sharding.PartitionSpec()),
                            out_specs=spec, check_vma=False)
    return sharded(query, key, value, pattern_id)

  return attend


def _check_shardable(shape, spec, mesh):
  for dim, name in ((0, "batch"), (2, "heads")):
    axes = spec[dim]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    ways = math.prod(mesh.shape[a] for a in axes)
    if shape[dim] % ways:
      raise ValueError(f"splash attention: {name}={shape[dim]} is not divisible by mesh axes "
                       f"{axes} of total size {ways} (activation_{name} in the logical axis rules)")
