"""DALL·E's sparse attention masks (row / column / convolutional) and two kernels that apply them.

The transformer's sequence is `text_length` text tokens then a `grid_size`×`grid_size` grid of image
tokens in row-major (raster) order, L = text_length + grid_size². Masks are bool [L, L] over
(query i, key j), True where i may attend to j:

  text query  → text keys   causal (j ≤ i); text never sees image keys
  image query → text keys   all of them
  image query → image keys  by pattern, always causal in raster order (key index ≤ query index):
    "row"     the query itself and the grid_size keys before it: its row so far and, in the row
              above, the keys from its own column rightwards
    "column"  keys in the query's column: the same column in this and every earlier row
    "conv"    keys in the kernel_size×kernel_size window centred on the query (|Δr|, |Δc| ≤ k//2)
              that precede it in raster order: the k//2 rows above (k columns, clipped at the
              edges), the k//2 keys to its left in its own row, and the query itself

These follow the DALL·E paper (Ramesh et al. 2021, appendix B.1 and Fig. 11): every image token sees
all text, text is causal, row and column attention alternate through the stack and the last layer
uses convolutional attention, 11×11 at full size. Row and column are the two heads of the Sparse
Transformer's strided pattern (Child et al. 2019, whose authors DALL·E shares) with the stride set to
the row length: the previous grid_size positions and every grid_size-th one. In Fig. 11 the row mask of
a 4×4 grid is a band of 5 (a token and the 4 before it, across row boundaries), which an axial
"same row only" reading cannot give; with next-token prediction the band also lets a row layer see
the code directly above the one being predicted. The paper runs column layers on transposed image
states (Fig. 11c); the splash kernel does the same (`transpose_image`), which changes the block
layout, not which keys a query sees. Every query sees itself, so no row of a mask is empty and the
softmax is always defined.

Layer schedule: layer i (1-based) of n uses "column" when (i − 2) mod 4 = 0, "row" otherwise, and the
last layer uses "conv". A scanned stack carries the per-layer pattern id (`layer_pattern_ids`) and
the attention function selects the mask (dense) or the kernel (splash) from it.

Kernels, behind one `make_attention_fn(kind, ...)` returning `fn(query, key, value, pattern_id)`:
  "dense"   XLA softmax attention with the selected [L, L] mask (CPU, GPU, TPU); compute is L².
  "axial"   XLA too, without the [L, L] product for row and column layers: each image query
            scores all text keys and the 2·grid_size keys of its row and the row above (column:
            the grid_size keys of its column, on transposed image tokens), text queries the text;
            conv layers run "dense". Compute per row/column layer is at most text_length +
            2·grid_size per image query instead of L (bench/dalle_step.py times it).
  "splash"  TPU splash attention (Pallas): each pattern is a block-sparse mask, so blocks of the
            [L, L] grid that are all False are never computed. `block_counts` says how many are:
            at full size (1280 tokens, blocks of 128) row 34 of 100, column 27, conv 40, causal 55.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

from mmjax.models import layers

PATTERNS = ("row", "column", "conv")
KINDS = ("dense", "axial", "splash")


def layer_patterns(num_layers):
  """Each layer's pattern (index 0 = layer 1): column when (i − 2) mod 4 = 0, else row; the last conv."""
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
    allowed = index[:, None] - index[None, :] <= grid_size
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
  kind="splash": TPU splash attention chosen with lax.switch: block-sparse row and conv kernels,
    and column as the row kernel on transposed image tokens. It runs inside `jax.shard_map` over the
    mesh axes that `rules` give `activation_batch` and `activation_heads` (`mesh`/`rules` default to
    the ones in context: `jax.set_mesh`, `nn.logical_axis_rules`; without a mesh it runs unsharded);
    a sequence sharded by `activation_length` is gathered first. L is padded up to a multiple of
    `block_size` (a multiple of 128) with masked positions; `interpret=True` runs the Pallas kernel
    on the CPU (tests).
  """
  if kind == "dense":
    return _dense_attention_fn(text_length, grid_size, kernel_size)
  if kind == "axial":
    return _axial_attention_fn(text_length, grid_size, kernel_size)
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


@functools.lru_cache(maxsize=16)
def _constant_mask_stack(text_length, grid_size, kernel_size):
  masks = mask_stack(text_length, grid_size, kernel_size)
  masks.flags.writeable = False  # shared between callers
  return masks


def _dense_attention_fn(text_length, grid_size, kernel_size):
  masks = _constant_mask_stack(text_length, grid_size, kernel_size)

  def attend(query, key, value, pattern_id):
    _check_inputs(query, key, value, masks.shape[-1])
    mask = jax.lax.dynamic_index_in_dim(jnp.asarray(masks), pattern_id, keepdims=False)
    return layers.dot_product_attention(query, key, value, mask=mask[None, None])

  return attend


@functools.lru_cache(maxsize=16)
def _grid_row_masks(grid_size, band):
  """bool [g rows, g query columns, K keys]: the keys each image query sees among its own row (K = g)
  or, with `band`, the row above followed by its own row (K = 2g; `image_mask`'s "row")."""
  g = grid_size
  own = np.tril(np.ones((g, g), np.bool_))                       # key column ≤ query column
  if not band:
    return np.broadcast_to(own, (g, g, g))
  above = np.triu(np.ones((g, g), np.bool_))                     # key column ≥ query column
  rows = np.arange(g)[:, None, None] > 0                          # row 0 has no row above
  masks = np.concatenate([above[None] & rows, np.broadcast_to(own, (g, g, g))], axis=-1)
  masks.flags.writeable = False  # shared between callers
  return masks


def _row_attention(query, key, value, text_length, grid_size, band):
  """Row-wise attention computed over each query's own keys: text causal over text, and each image
  query over all text plus the keys `_grid_row_masks` gives it in its own row (and, with `band`, the
  row above), one softmax over both (shapes as `attend`)."""
  batch, _, heads, depth = query.shape
  t, g = text_length, grid_size
  grid = lambda x: x[:, t:].reshape(batch, g, g, heads, depth)  # noqa: E731  [B, row, col, H, D]
  if band:  # each row's keys: the row above (zeros above row 0, masked) then the row itself
    rows = lambda x: jnp.concatenate([jnp.pad(x, ((0, 0), (1, 0), (0, 0), (0, 0), (0, 0)))[:, :-1], x],  # noqa: E731
                                     axis=2)
  else:
    rows = lambda x: x  # noqa: E731
  image_query = grid(query * jnp.asarray(depth ** -0.5, query.dtype))
  row_logits = jnp.einsum("brchd,brkhd->brhck", image_query, rows(grid(key))).astype(jnp.float32)
  mask = _grid_row_masks(g, band)[:, None]                        # [row, 1 (heads), col, K]
  logits = jnp.where(mask, row_logits, jnp.finfo(jnp.float32).min)
  if t:
    text_logits = jnp.einsum("brchd,bthd->brhct", image_query, key[:, :t]).astype(jnp.float32)
    logits = jnp.concatenate([text_logits, logits], axis=-1)
  weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
  image = jnp.einsum("brhck,brkhd->brchd", weights[..., t:], rows(grid(value)))
  if not t:
    return image.reshape(batch, g * g, heads, depth)
  image = image + jnp.einsum("brhct,bthd->brchd", weights[..., :t], value[:, :t])
  text = layers.dot_product_attention(query[:, :t], key[:, :t], value[:, :t],
                                      mask=np.tril(np.ones((t, t), np.bool_))[None, None])
  return jnp.concatenate([text, image.reshape(batch, g * g, heads, depth)], axis=1)


def _axial_attention_fn(text_length, grid_size, kernel_size):
  dense = _dense_attention_fn(text_length, grid_size, kernel_size)
  row = functools.partial(_row_attention, text_length=text_length, grid_size=grid_size, band=True)
  # Column attention is attention within a row once the image is transposed (`transpose_image`).
  axial = functools.partial(_row_attention, text_length=text_length, grid_size=grid_size, band=False)
  transpose = functools.partial(transpose_image, text_length=text_length, grid_size=grid_size)
  branches = (row,                                                                        # row
              lambda q, k, v: transpose(axial(transpose(q), transpose(k), transpose(v))),  # column
              lambda q, k, v: dense(q, k, v, PATTERNS.index("conv")))                  # conv

  def attend(query, key, value, pattern_id):
    _check_inputs(query, key, value, text_length + grid_size * grid_size)
    return jax.lax.switch(pattern_id, branches, query, key, value)

  return attend


# ----------------------------------------------------------------------------- splash (TPU)

def transpose_image(x, text_length, grid_size):
  """[B, L, ...] with the image tokens moved from row-major to column-major order (its own inverse).

  Column attention in raster order is attention within a row, causal, in column-major order:
  (r', c) precedes (r, c) in raster order exactly when r' ≤ r, i.e. when it precedes it in
  column-major order. The paper (Fig. 11c) runs column layers on transposed image states for this
  reason; here it turns the column mask's causal triangle of blocks into a narrow band.
  """
  text, image = x[:, :text_length], x[:, text_length:]
  grid = image.reshape(x.shape[0], grid_size, grid_size, *x.shape[2:]).swapaxes(1, 2)
  return jnp.concatenate([text, grid.reshape(image.shape)], axis=1)


def padded_length(length, block_size):
  """`length` rounded up to a multiple of `block_size` (which must be a multiple of 128)."""
  if block_size < 128 or block_size % 128:
    raise ValueError(f"splash attention: block_size={block_size} must be a positive multiple of 128 "
                     "(the TPU lane width)")
  return -(-length // block_size) * block_size


def padded_mask(pattern, text_length, grid_size, kernel_size, block_size, transposed=False):
  """`dalle_mask` padded to a multiple of `block_size`; `transposed`: over image tokens in
  column-major order (`transpose_image`). Padded queries see only themselves, so every row is
  non-empty (no NaNs, forward or backward) and real queries never see padded keys: the real outputs
  are exact."""
  mask = dalle_mask(pattern, text_length, grid_size, kernel_size)
  length = mask.shape[0]
  if transposed:  # numpy, not transpose_image: this runs inside traces
    image = np.arange(grid_size * grid_size).reshape(grid_size, grid_size).T.ravel() + text_length
    order = np.concatenate([np.arange(text_length), image])
    mask = mask[np.ix_(order, order)]
  padded = padded_length(length, block_size)
  out = np.zeros((padded, padded), np.bool_)
  out[:length, :length] = mask
  out[np.arange(length, padded), np.arange(length, padded)] = True
  return out


def splash_masks(text_length, grid_size, kernel_size, block_size):
  """pattern → the padded bool mask its splash kernel runs; "column" runs on transposed image tokens
  (`transpose_image`), where its mask is a band."""
  return {pattern: padded_mask(pattern, text_length, grid_size, kernel_size, block_size,
                               transposed=pattern == "column") for pattern in PATTERNS}


def _computed_blocks(mask, block_size):
  blocks = mask.shape[0] // block_size
  tiles = mask.reshape(blocks, block_size, blocks, block_size)
  return int(tiles.any(axis=(1, 3)).sum()), blocks * blocks


def block_counts(text_length, grid_size, kernel_size=11, block_size=128):
  """{name: (blocks computed, blocks of the dense L×L grid)} for each splash kernel.

  A block (block_size×block_size tile of the padded [L, L] mask) is computed when any entry in it is
  True; splash skips the rest. Besides PATTERNS: "causal" (a plain causal mask, what a dense causal
  kernel with block skipping computes) and "column_raster" (the column mask without the transpose).
  """
  masks = splash_masks(text_length, grid_size, kernel_size, block_size)
  length = text_length + grid_size * grid_size
  padded = padded_length(length, block_size)
  causal = np.tril(np.ones((padded, padded), np.bool_))
  column = padded_mask("column", text_length, grid_size, kernel_size, block_size)
  counts = {name: _computed_blocks(mask, block_size) for name, mask in masks.items()}
  counts["causal"] = _computed_blocks(causal, block_size)
  counts["column_raster"] = _computed_blocks(column, block_size)
  return counts


def _block_sizes(block_size):
  return splash.BlockSizes(
      block_q=block_size, block_kv=block_size, block_kv_compute=block_size,
      block_q_dkv=block_size, block_kv_dkv=block_size, block_kv_dkv_compute=block_size,
      block_q_dq=block_size, block_kv_dq=block_size)


def make_splash_kernels(text_length, grid_size, kernel_size, block_size, heads, interpret=False):
  """pattern → splash MHA kernel over [heads, L_padded, D] ("column" expects transposed image tokens).

  Built afresh in each trace (the kernel holds its block metadata as arrays, which must belong to the
  trace); the numpy work behind them is cached here and in splash (keyed by mask contents)."""
  kernels = {}
  for name, mask in _splash_numpy_masks(text_length, grid_size, kernel_size, block_size):
    # Every head shares its layer's mask: splash keeps one copy of the block metadata.
    kernels[name] = splash.make_splash_mha(
        splash.MultiHeadMask((mask,) * heads), block_sizes=_block_sizes(block_size), head_shards=1,
        q_seq_shards=1, interpret=interpret)
  return kernels


class _HashOnceMask(splash.NumpyMask):
  """A NumpyMask of a read-only array that hashes it once: splash's metadata cache hashes every head's
  mask on each lookup (62 × 1.6 MB at full size)."""

  def __post_init__(self):
    super().__post_init__()
    self.array.flags.writeable = False
    self._hash = hash((type(self), self.array.tobytes()))

  def __hash__(self):
    return self._hash


@functools.lru_cache(maxsize=8)
def _splash_numpy_masks(text_length, grid_size, kernel_size, block_size):
  masks = splash_masks(text_length, grid_size, kernel_size, block_size)
  return tuple((name, _HashOnceMask(masks[name])) for name in PATTERNS)


def _splash_attention_fn(text_length, grid_size, kernel_size, *, mesh, rules, block_size,
                         interpret):
  length = text_length + grid_size * grid_size
  padded = padded_length(length, block_size)

  def branch(kernel, transpose):
    def run(query, key, value):
      # [B, L, H, D] → splash's [H, L_padded, D] per example, vmapped over the batch.
      if transpose:
        query, key, value = (transpose_image(x, text_length, grid_size) for x in (query, key, value))
      pad = ((0, 0), (0, padded - length), (0, 0), (0, 0))
      q, k, v = (jnp.pad(x, pad).transpose(0, 2, 1, 3) for x in (query, key, value))
      out = jax.vmap(kernel)(q, k, v).transpose(0, 2, 1, 3)[:, :length]
      return transpose_image(out, text_length, grid_size) if transpose else out
    return run

  def local_attention(query, key, value, pattern_id):
    heads, depth = query.shape[2:]
    by_name = make_splash_kernels(text_length, grid_size, kernel_size, block_size, heads, interpret)
    branches = [branch(by_name[name], name == "column") for name in PATTERNS]
    query = query * jnp.asarray(depth ** -0.5, query.dtype)  # splash leaves the scaling to us
    return jax.lax.switch(pattern_id, branches, query, key, value).astype(query.dtype)

  def attend(query, key, value, pattern_id):
    _check_inputs(query, key, value, length)
    pattern_id = jnp.asarray(pattern_id, jnp.int32)
    context_mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    platform = _target_platform(context_mesh)
    if platform != "tpu" and not interpret:
      raise ValueError(f"splash attention is a TPU kernel and this computation targets {platform}: "
                       "use the dense kernel there (or interpret=True, to test it on the CPU)")
    if context_mesh.empty or context_mesh.size == 1:
      return local_attention(query, key, value, pattern_id)
    context_rules = nn.get_logical_axis_rules() if rules is None else rules
    spec = nn.logical_to_mesh_axes(("activation_batch", None, "activation_heads", None),
                                   tuple(context_rules))
    _check_shardable(query.shape, spec, context_mesh)
    # Pallas kernels cannot be partitioned by XLA: each device runs its own batch and heads.
    sharded = jax.shard_map(local_attention, mesh=context_mesh,
                            in_specs=(spec, spec, spec, PartitionSpec()), out_specs=spec,
                            check_vma=False)
    return sharded(query, key, value, pattern_id)

  return attend


def _target_platform(mesh):
  """The platform a trace compiles for: the mesh's devices (compile-only TPU topologies included)."""
  if mesh.empty:
    return jax.default_backend()
  if isinstance(mesh, jax.sharding.AbstractMesh):
    return mesh.abstract_device.platform if mesh.abstract_device else jax.default_backend()
  return mesh.devices.flat[0].platform


def _check_shardable(shape, spec, mesh):
  for dim, name in ((0, "batch"), (2, "heads")):
    axes = spec[dim]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    ways = math.prod(mesh.shape[a] for a in axes)
    if shape[dim] % ways:
      raise ValueError(f"splash attention: {name}={shape[dim]} is not divisible by mesh axes {axes} "
                       f"of total size {ways} (the activation_{name} rule in the logical axis rules)")
