"""Transformer building blocks shared by CLIP and DALL·E, annotated with logical axes.

Parameters carry the logical names `embed, mlp, heads, kv, vocab` (and `layers` for scanned stacks);
activations are constrained to `activation_batch, activation_length, activation_embed,
activation_heads, activation_mlp`. The rules in `config.logical_axis_rules` map them onto the mesh.

  LayerNorm            f32 statistics whatever the compute dtype (OpenAI's fp16-safe LayerNorm)
  MultiHeadAttention   q/k/v projections (HeadsProjection) → `dot_product_attention` with an
                       optional boolean mask (True = may attend) and an optional additive bias
                       → out projection (HeadsOutput)
  Mlp                  Dense → gelu | quick_gelu → Dense
  ResidualBlock        pre-norm: x + attn(ln_1(x)); x + mlp(ln_2(x))
  Transformer          `layers` ResidualBlocks, optionally `nn.scan`-ned and/or rematerialised

Layouts of a Transformer's parameters: unscanned, block i lives under `blocks_{i}`; with
`scan_layers=True` one subtree `blocks` holds every block's arrays stacked on a leading `layers`
axis. `stack_layers` / `unstack_layers` convert a parameter tree between the two.
"""

import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ACTIVATIONS = ("gelu", "quick_gelu")
RESIDUAL = ("activation_batch", "activation_length", "activation_embed")
HEADS = ("activation_batch", "activation_length", "activation_heads", None)
MLP_HIDDEN = ("activation_batch", "activation_length", "activation_mlp")
BLOCKS = "blocks"


def quick_gelu(x):
  """x·σ(1.702x): the GELU approximation OpenAI's CLIP was trained with."""
  return x * jax.nn.sigmoid(1.702 * x)


def activation_fn(name):
  if name == "gelu":
    return lambda x: jax.nn.gelu(x, approximate=False)  # torch's nn.GELU() is the exact erf form
  if name == "quick_gelu":
    return quick_gelu
  raise ValueError(f"activation={name!r}: expected one of {ACTIVATIONS}")


def normal_init(stddev, axes):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev), axes)


def zeros_init(axes):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def dot_product_attention(query, key, value, mask=None, bias=None):
  """softmax(q·kᵀ/√d + bias, masked) · v with the softmax in f32.

  query [B, Lq, H, D], key/value [B, Lk, H, D]; `mask` broadcastable to [B, H, Lq, Lk], True where
  a query may attend; `bias` (additive, e.g. relative positions) broadcastable to the same shape.
  Returns [B, Lq, H, D] in the query's dtype.
  """
  depth = query.shape[-1]
  logits = jnp.einsum("bqhd,bkhd->bhqk", query * jnp.asarray(depth ** -0.5, query.dtype), key)
  logits = logits.astype(jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, value)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis, computed in f32; the output is cast to `dtype`."""
  epsilon: float = 1e-5  # torch's default, which OpenAI's checkpoints were trained with
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                       (features,), self.param_dtype)
    bias = self.param("bias", zeros_init(("embed",)), (features,), self.param_dtype)
    x = x.astype(jnp.float32)
    mean = x.mean(axis=-1, keepdims=True)
    variance = jnp.square(x - mean).mean(axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(variance + self.epsilon)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class HeadsProjection(nn.Module):
  """[B, L, width] → [B, L, heads, head_dim]: kernel [embed, heads, kv], bias [heads, kv]."""
  heads: int = 8
  head_dim: int = 64
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    kernel = self.param("kernel", normal_init(width ** -0.5, ("embed", "heads", "kv")),
                        (width, self.heads, self.head_dim), self.param_dtype)
    bias = self.param("bias", zeros_init(("heads", "kv")), (self.heads, self.head_dim), self.param_dtype)
    x = jnp.einsum("blw,whd->blhd", x.astype(self.dtype), kernel.astype(self.dtype))
    return x + bias.astype(self.dtype)


class HeadsOutput(nn.Module):
  """[B, L, heads, head_dim] → [B, L, width]: kernel [heads, kv, embed], bias [embed]."""
  width: int = 512
  init_std: float = 0.02
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    heads, head_dim = x.shape[-2:]
    kernel = self.param("kernel", normal_init(self.init_std, ("heads", "kv", "embed")),
                        (heads, head_dim, self.width), self.param_dtype)
    bias = self.param("bias", zeros_init(("embed",)), (self.width,), self.param_dtype)
    x = jnp.einsum("blhd,hdw->blw", x.astype(self.dtype), kernel.astype(self.dtype))
    return x + bias.astype(self.dtype)


class MultiHeadAttention(nn.Module):
  """Self-attention over [B, L, width] with `heads` heads of width // heads.

  Params: query/key/value {kernel [embed, heads, kv], bias [heads, kv]} and out {kernel
  [heads, kv, embed], bias [embed]}. `attention_fn` is swappable (same signature as
  `dot_product_attention`) so a model can plug in a TPU kernel.
  """
  heads: int = 8
  out_init_std: float = 0.02
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32
  attention_fn: Callable[..., Any] = dot_product_attention

  @nn.compact
  def __call__(self, x, mask=None, bias=None, queries_from=None):
    """`queries_from` [B, Lq, width] (default x): the positions that ask; keys and values come from x."""
    width = x.shape[-1]
    if width % self.heads:
      raise ValueError(f"attention: width {width} is not divisible by heads={self.heads}")
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    sources = {"query": x if queries_from is None else queries_from, "key": x, "value": x}
    query, key, value = (
        nn.with_logical_constraint(HeadsProjection(self.heads, width // self.heads, name=name, **common)(source),
                                   HEADS)
        for name, source in sources.items())
    attended = nn.with_logical_constraint(self.attention_fn(query, key, value, mask=mask, bias=bias), HEADS)
    out = HeadsOutput(width, self.out_init_std, name="out", **common)(attended)
    return nn.with_logical_constraint(out, RESIDUAL)


class Mlp(nn.Module):
  """Dense(width → mlp_dim) → activation → Dense(mlp_dim → width); params `fc` and `proj`."""
  mlp_dim: int = 2048
  activation: str = "gelu"
  out_init_std: float = 0.02
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    hidden = nn.Dense(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="fc",
                      kernel_init=normal_init((2 * width) ** -0.5, ("embed", "mlp")),
                      bias_init=zeros_init(("mlp",)))(x)
    hidden = nn.with_logical_constraint(activation_fn(self.activation)(hidden), MLP_HIDDEN)
    out = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name="proj",
                   kernel_init=normal_init(self.out_init_std, ("mlp", "embed")),
                   bias_init=zeros_init(("embed",)))(hidden)
    return nn.with_logical_constraint(out, RESIDUAL)


class ResidualBlock(nn.Module):
  """Pre-norm block (OpenAI's ResidualAttentionBlock): x + attn(ln_1(x)), then x + mlp(ln_2(x))."""
  heads: int = 8
  mlp_dim: int = 2048
  activation: str = "gelu"
  out_init_std: float = 0.02
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32
  attention_fn: Callable[..., Any] = dot_product_attention

  @nn.compact
  def __call__(self, x, mask=None, bias=None, output_index=None):
    """x [B, L, width] → [B, L, width]; with `output_index` (int [B]) → [B, 1, width], the block's output
    at one position per example, computed at that position alone (keys and values still see all of x)."""
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attention = MultiHeadAttention(self.heads, self.out_init_std, attention_fn=self.attention_fn,
                                   name="attn", **common)
    normed = LayerNorm(name="ln_1", **common)(x)
    queries_from = None
    if output_index is not None:
      x, queries_from = (at_positions(a, output_index) for a in (x, normed))
      mask, bias = (None if a is None else query_rows(a, output_index) for a in (mask, bias))
    x = x + attention(normed, mask=mask, bias=bias, queries_from=queries_from)
    x = nn.with_logical_constraint(x, RESIDUAL)
    x = x + Mlp(self.mlp_dim, self.activation, self.out_init_std, name="mlp", **common)(
        LayerNorm(name="ln_2", **common)(x))
    return nn.with_logical_constraint(x, RESIDUAL)


class _ScanBlock(ResidualBlock):
  """A ResidualBlock with nn.scan's (carry, output) signature."""

  def __call__(self, x, mask=None, bias=None):  # pylint: disable=arguments-differ
    return super().__call__(x, mask, bias), None


class Transformer(nn.Module):
  """`layers` pre-norm blocks over [B, L, width]; the same mask/bias goes to every block.

  Output projections start at N(0, width^-½ · (2·layers)^-½), as OpenAI's CLIP initialises them.
  `scan_layers` compiles one block and loops (params stacked on a `layers` axis under `blocks`);
  `remat` recomputes each block's activations in the backward pass.
  """
  layers: int = 12
  heads: int = 8
  mlp_dim: int = 2048
  activation: str = "gelu"
  scan_layers: bool = False
  remat: bool = False
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32
  attention_fn: Callable[..., Any] = dot_product_attention

  @nn.compact
  def __call__(self, x, mask=None, bias=None, output_index=None):
    """x [B, L, width] → [B, L, width], or [B, width] at `output_index` (int [B]) when given: unscanned,
    the last block then computes that position only (a pooled readout needs nothing else)."""
    width = x.shape[-1]
    fields = dict(heads=self.heads, mlp_dim=self.mlp_dim, activation=self.activation,
                  out_init_std=width ** -0.5 * (2 * self.layers) ** -0.5, dtype=self.dtype,
                  param_dtype=self.param_dtype, attention_fn=self.attention_fn)
    x = nn.with_logical_constraint(x.astype(self.dtype), RESIDUAL)
    if self.scan_layers:
      block = nn.remat(_ScanBlock, prevent_cse=False) if self.remat else _ScanBlock
      stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast, nn.broadcast), length=self.layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(name=BLOCKS, **fields)(x, mask, bias)
      return x if output_index is None else at_positions(x, output_index)[:, 0]
    block = nn.remat(ResidualBlock) if self.remat else ResidualBlock
    for i in range(self.layers):
      last = i == self.layers - 1 and output_index is not None
      x = block(name=f"{BLOCKS}_{i}", **fields)(x, mask, bias, output_index if last else None)
    return x if output_index is None else x[:, 0]


def at_positions(x, index):
  """x [B, L, ...] → [B, 1, ...]: row index[b] of example b."""
  return x[jnp.arange(x.shape[0]), index][:, None]


def query_rows(a, index):
  """A mask or bias broadcastable to [B, H, Lq, Lk] → [B, H, 1, Lk]: query row index[b] of example b."""
  a = jnp.broadcast_to(a, (index.shape[0],) + a.shape[1:])
  return a[jnp.arange(index.shape[0]), :, index][:, :, None]


def causal_mask(length):
  """[1, 1, length, length] bool, True on and below the diagonal (position i sees positions ≤ i)."""
  return jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None]


# ----------------------------------------------------------------------------- parameter layouts

def _stack(leaves):
  if all(isinstance(leaf, np.ndarray) for leaf in leaves):
    return np.stack(leaves)
  return jnp.stack(leaves)


def stack_layers(params, name=BLOCKS):
  """Unscanned params (`{name}_0` … `{name}_{n-1}` subtrees, anywhere in the tree) → the scanned
  layout (one `{name}` subtree, arrays stacked on a new leading axis). Other entries are kept."""
  if not isinstance(params, dict):
    return params
  pattern = re.compile(rf"{re.escape(name)}_(\d+)")
  indices = sorted(int(m.group(1)) for m in map(pattern.fullmatch, params) if m)
  if indices and indices != list(range(len(indices))):
    raise ValueError(f"stack_layers: layers {indices} are not 0 … {len(indices) - 1}")
  stacked = {k: stack_layers(v, name) for k, v in params.items() if not pattern.fullmatch(k)}
  if indices:
    if name in stacked:
      raise ValueError(f"stack_layers: both {name!r} and {name}_0 … are present")
    blocks = [params[f"{name}_{i}"] for i in indices]
    stacked[name] = jax.tree.map(lambda *leaves: _stack(leaves), *blocks)
  return stacked


def unstack_layers(params, name=BLOCKS):
  """The scanned layout → `{name}_0` … `{name}_{n-1}` subtrees (inverse of `stack_layers`)."""
  if not isinstance(params, dict):
    return params
  unstacked = {k: unstack_layers(v, name) for k, v in params.items() if k != name}
  if name in params:
    blocks = params[name]
    count = jax.tree.leaves(blocks)[0].shape[0]
    for i in range(count):
      unstacked[f"{name}_{i}"] = jax.tree.map(lambda leaf, i=i: leaf[i], blocks)
  return unstacked

