"""The floor under a CLIP train step: its dense products alone, in JAX and in PyTorch.

`bench/clip.py --calls=train_matmuls` times them; a train step can run no faster than its matmuls,
so this bounds what any change outside the matmul kernels can win (README, Benchmarks).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def train_products(sizes, vision_heads, batch):
  """The dense products of one CLIP train step, as OpenAI's model and mmjax's scanned towers do them:
  [(count, kind, dims)] for clip-anytorch `sizes` at `batch`.

  ("linear", rows, in, out): x @ w, then dy @ wᵀ and xᵀ @ dy in the backward; ("attention",
  batch × heads, tokens, head width): q kᵀ and p v, then their four gradient products; ("patches",
  rows, in, out): the patch embedding, whose input (the images) needs no gradient. The projections
  to the embedding (one row per example) and the batch × batch logits are left out.
  """
  vision_width, text_width = sizes["vision_width"], sizes["transformer_width"]
  vision_tokens = (sizes["image_resolution"] // sizes["vision_patch_size"]) ** 2 + 1  # + class token
  text_tokens = sizes["context_length"]
  products = [(1, "patches", (batch * (vision_tokens - 1), 3 * sizes["vision_patch_size"] ** 2, vision_width))]
  for layers, width, heads, tokens in ((sizes["vision_layers"], vision_width, vision_heads, vision_tokens),
                                       (sizes["transformer_layers"], text_width, sizes["transformer_heads"],
                                        text_tokens)):
    for fan_in, fan_out in ((width, 3 * width), (width, width), (width, 4 * width), (4 * width, width)):
      products.append((layers, "linear", (batch * tokens, fan_in, fan_out)))
    products.append((layers, "attention", (batch * heads, tokens, width // heads)))
  return products


def operands(kind, dims, seed=0):
  """Random f32 operands of one product group: linear/patches (x, w, dy); attention (q, k, v, p, dout)."""
  rng = np.random.default_rng(seed)
  if kind == "attention":
    groups, tokens, head_width = dims
    shapes = [(groups, tokens, head_width)] * 3 + [(groups, tokens, tokens), (groups, tokens, head_width)]
  else:
    rows, fan_in, fan_out = dims
    shapes = [(rows, fan_in), (fan_in, fan_out), (rows, fan_out)]
  return [rng.normal(size=shape).astype(np.float32) for shape in shapes]


@functools.partial(jax.jit, static_argnums=0)
def jax_products(kind, *arrays):
  """Every product of one group (`operands`), jitted: XLA:CPU's dot kernels."""
  if kind == "attention":
    q, k, v, p, dout = arrays
    return (jnp.einsum("gqd,gkd->gqk", q, k), jnp.einsum("gqk,gkd->gqd", p, v),
            jnp.einsum("gqd,gkd->gqk", dout, v), jnp.einsum("gqk,gqd->gkd", p, dout),
            jnp.einsum("gqk,gkd->gqd", p, k), jnp.einsum("gqk,gqd->gkd", p, q))
  x, w, dy = arrays
  forward, weight_gradient = x @ w, x.T @ dy
  return (forward, weight_gradient) if kind == "patches" else (forward, weight_gradient, dy @ w.T)


def torch_products(kind, *tensors):
  """The same products on torch tensors, with transposed views as autograd uses them."""
  if kind == "attention":
    q, k, v, p, dout = tensors
    return (q @ k.transpose(1, 2), p @ v, dout @ v.transpose(1, 2), p.transpose(1, 2) @ dout, p @ k,
            p.transpose(1, 2) @ q)
  x, w, dy = tensors
  forward, weight_gradient = x @ w, x.t() @ dy
  return (forward, weight_gradient) if kind == "patches" else (forward, weight_gradient, dy @ w.t())


def caller(groups, call):
  """A function running every group of `groups` ([(count, kind, arrays)]) `count` times through
  `call(kind, *arrays)`; it returns the last call's products."""
  def run():
    out = None
    for count, kind, arrays in groups:
      for _ in range(count):
        out = call(kind, *arrays)
    return out
  return run
