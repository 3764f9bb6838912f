"""DALL·E attention: masks against element-by-element definitions, the layer schedule, dense attention,
splash attention (the Pallas kernel in interpret mode on the CPU, and compiled for a TPU topology)."""

import functools
import importlib.util

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import attention
from mmjax.models import layers

RULES = (("activation_batch", ("data", "fsdp")), ("activation_length", None),
         ("activation_heads", "tensor"), ("activation_embed", None))
SMALL = [(3, 4, 3), (0, 5, 5), (2, 3, 1), (4, 6, 11)]  # (text_length, grid_size, kernel_size)


def reference_mask(pattern, text_length, grid_size, kernel_size):
  """The mask spelt out one (query, key) pair at a time."""
  length = text_length + grid_size ** 2
  mask = np.zeros((length, length), bool)
  for i in range(length):
    for j in range(length):
      if i < text_length:
        mask[i, j] = j < text_length and j <= i
      elif j < text_length:
        mask[i, j] = True
      elif j <= i:
        (qr, qc), (kr, kc) = divmod(i - text_length, grid_size), divmod(j - text_length, grid_size)
        if pattern == "row":  # itself and the grid_size keys before it in raster order
          mask[i, j] = (qr * grid_size + qc) - (kr * grid_size + kc) <= grid_size
        elif pattern == "column":
          mask[i, j] = qc == kc
        else:
          mask[i, j] = abs(qr - kr) <= kernel_size // 2 and abs(qc - kc) <= kernel_size // 2
  return mask


@pytest.mark.parametrize("sizes", SMALL)
@pytest.mark.parametrize("pattern", attention.PATTERNS)
def test_mask_matches_elementwise_definition(pattern, sizes):
  np.testing.assert_array_equal(attention.dalle_mask(pattern, *sizes), reference_mask(pattern, *sizes))


def test_mask_stack_is_in_pattern_order():
  stack = attention.mask_stack(3, 4, 3)
  assert stack.shape == (3, 19, 19) and stack.dtype == np.bool_
  for i, pattern in enumerate(attention.PATTERNS):
    np.testing.assert_array_equal(stack[i], attention.dalle_mask(pattern, 3, 4, 3))


def test_full_size_mask_counts():
  t, g = 256, 32
  masks = dict(zip(attention.PATTERNS, attention.mask_stack(t, g, 11)))
  query = t + 10 * g + 10  # image token (row 10, column 10)
  assert masks["row"][query].sum() == t + 33           # itself and the 32 tokens before it
  assert masks["row"][query, query - g] and not masks["row"][query, query - g - 1]  # from the one above
  assert masks["column"][query].sum() == t + 11        # rows 0..10 of column 10
  assert masks["conv"][query].sum() == t + 5 * 11 + 6  # 5 rows above × 11, 5 to the left, itself
  corner = t + g * g - 1                               # the last token sees a clipped window
  assert masks["conv"][corner].sum() == t + 5 * 6 + 6
  assert masks["row"][5].sum() == 6 and not masks["row"][5, t:].any()  # text: causal, no image
  assert all(m.diagonal().all() for m in masks.values())                 # no empty softmax row


def test_layer_schedule():
  assert attention.layer_patterns(6) == ("row", "column", "row", "row", "row", "conv")
  assert attention.layer_patterns(1) == ("conv",)
  patterns = attention.layer_patterns(64)
  assert [i for i, p in enumerate(patterns, 1) if p == "column"] == list(range(2, 63, 4))
  assert patterns.count("row") == 47 and patterns[-1] == "conv" and patterns.count("conv") == 1
  ids = attention.layer_pattern_ids(64)
  assert ids.dtype == np.int32 and [attention.PATTERNS[i] for i in ids] == list(patterns)
  with pytest.raises(ValueError, match="num_layers"):
    attention.layer_patterns(0)


def test_column_is_causal_attention_within_rows_on_transposed_image_tokens():
  t, g = 3, 5
  order = np.asarray(attention.transpose_image(np.arange(t + g * g)[None], t, g))[0]
  assert list(order[:t]) == [0, 1, 2] and list(order[t:t + 3]) == [t, t + g, t + 2 * g]
  column = attention.dalle_mask("column", t, g)
  within_rows = column.copy()
  image = np.arange(g * g)
  within_rows[t:, t:] = (image[:, None] // g == image[None, :] // g) & (image[None, :] <= image[:, None])
  np.testing.assert_array_equal(column[np.ix_(order, order)], within_rows)
  padded = attention.padded_mask("column", t, g, 3, 128, transposed=True)
  np.testing.assert_array_equal(padded[:t + g * g, :t + g * g], within_rows)


def random_qkv(shape, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)  # numpy: jax.random would compile for every shape
  return tuple(jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for _ in range(3))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_equals_dot_product_attention_with_the_mask(dtype):
  t, g, k = 3, 4, 3
  q, key, v = random_qkv((2, t + g * g, 2, 8), dtype)
  attend = jax.jit(attention.make_attention_fn("dense", t, g, k))
  for pattern_id, pattern in enumerate(attention.PATTERNS):
    out = attend(q, key, v, jnp.int32(pattern_id))
    expected = layers.dot_product_attention(q, key, v, mask=attention.dalle_mask(pattern, t, g, k))
    assert out.dtype == dtype
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expected, np.float32))
  # The patterns really differ, so a wrong pattern_id would be caught.
  assert not np.allclose(attend(q, key, v, 0), attend(q, key, v, 2))


def heads_sharding(mesh):
  return jax.sharding.NamedSharding(mesh, nn.logical_to_mesh_axes(layers.HEADS, RULES))


def mesh_222():
  return jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


def scanned_stack(attend, num_layers):
  """Loss of a toy layer stack scanning over the per-layer pattern ids, as the model does."""
  def loss(q, k, v):
    def layer(x, pattern_id):
      x = attend(x, k, v, pattern_id)
      return x, x.astype(jnp.float32).sum()
    x, sums = jax.lax.scan(layer, q, jnp.asarray(attention.layer_pattern_ids(num_layers)))
    return x.astype(jnp.float32).sum() + sums.sum()
  return loss


def unrolled_reference(text_length, grid_size, kernel_size, num_layers):
  def loss(q, k, v):
    x, total = q, 0.0
    for pattern in attention.layer_patterns(num_layers):
      x = layers.dot_product_attention(
          x, k, v, mask=attention.dalle_mask(pattern, text_length, grid_size, kernel_size))
      total += x.sum()
    return x.sum() + total
  return loss


def test_dense_under_scan_and_shardings():
  t, g, k = 3, 4, 3
  qkv = random_qkv((4, t + g * g, 2, 8))
  scanned = scanned_stack(attention.make_attention_fn("dense", t, g, k), 6)
  mesh = mesh_222()
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    spec = heads_sharding(mesh)
    qkv = jax.device_put(qkv, spec)
    value, grads = jax.jit(jax.value_and_grad(scanned, argnums=(0, 1, 2)))(*qkv)
  reference = jax.value_and_grad(unrolled_reference(t, g, k, 6), argnums=(0, 1, 2))
  expected, expected_grads = jax.jit(reference)(*qkv)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  for grad, expected_grad in zip(grads, expected_grads):
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sizes", [(3, 4, 3), (0, 3, 3), (5, 6, 5)])
def test_axial_equals_dense_for_every_pattern(sizes):
  """Row and column layers computed over their own keys give the masked dense result, gradients too."""
  t, g, k = sizes
  q, key, v = random_qkv((2, t + g * g, 2, 8))
  axial, dense = (attention.make_attention_fn(kind, t, g, k) for kind in ("axial", "dense"))
  for pattern_id in range(len(attention.PATTERNS)):
    loss = lambda fn, *qkv: (fn(*qkv, jnp.int32(pattern_id)) * v).sum()  # noqa: E731
    got, got_grads = jax.jit(jax.value_and_grad(functools.partial(loss, axial), argnums=(0, 1, 2)))(q, key, v)
    want, want_grads = jax.jit(jax.value_and_grad(functools.partial(loss, dense), argnums=(0, 1, 2)))(q, key, v)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(axial(q, key, v, pattern_id), dense(q, key, v, pattern_id), rtol=1e-5, atol=1e-6)
    for got_grad, want_grad in zip(got_grads, want_grads):
      np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-5)


def test_axial_under_scan():
  t, g, k = 3, 4, 3
  qkv = random_qkv((2, t + g * g, 2, 8))
  scanned = scanned_stack(attention.make_attention_fn("axial", t, g, k), 6)
  value, grads = jax.jit(jax.value_and_grad(scanned, argnums=(0, 1, 2)))(*qkv)
  expected, expected_grads = jax.jit(jax.value_and_grad(unrolled_reference(t, g, k, 6), argnums=(0, 1, 2)))(*qkv)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  for grad, expected_grad in zip(grads, expected_grads):
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-5)


# Interpret mode runs the Pallas kernel's own program on the CPU (block skipping and all).
@pytest.mark.parametrize("sizes", [(3, 4, 3), (16, 16, 5)])
def test_splash_interpret_equals_dense(sizes):
  t, g, k = sizes  # (16, 16, 5): L = 272, padded to 384 = 3 blocks of 128
  qkv = random_qkv((1, t + g * g, 2, 16))
  dense = attention.make_attention_fn("dense", t, g, k)
  splash = jax.jit(attention.make_attention_fn("splash", t, g, k, interpret=True))
  for pattern_id in range(3):
    np.testing.assert_allclose(splash(*qkv, pattern_id), dense(*qkv, pattern_id), atol=2e-6)


def test_splash_interpret_bfloat16():
  t, g, k = 3, 4, 3
  qkv = random_qkv((1, t + g * g, 2, 64), jnp.bfloat16)
  out = attention.make_attention_fn("splash", t, g, k, interpret=True)(*qkv, 1)
  expected = attention.make_attention_fn("dense", t, g, k)(*qkv, 1)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected, np.float32), atol=3e-2)


def test_splash_sharded_scan_gradients_equal_dense():
  t, g, k = 3, 4, 3
  qkv = random_qkv((4, t + g * g, 2, 8))
  splash = attention.make_attention_fn("splash", t, g, k, interpret=True)
  scanned = scanned_stack(splash, 6)
  with jax.set_mesh(mesh_222()), nn.logical_axis_rules(RULES):
    value, grads = jax.jit(jax.value_and_grad(scanned, argnums=(0, 1, 2)))(*qkv)
    jaxpr = jax.make_jaxpr(lambda q, k, v: splash(q, k, v, 0))(*qkv)
  reference = jax.value_and_grad(unrolled_reference(t, g, k, 6), argnums=(0, 1, 2))
  expected, expected_grads = jax.jit(reference)(*qkv)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  for grad, expected_grad in zip(grads, expected_grads):
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-5)
  # Each device runs the kernel on its own 1 example × 1 head: batch over (data, fsdp), heads over tensor.
  (shard_map,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "shard_map"]
  spec = jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor", None)
  assert shard_map.params["in_specs"][-2] == spec
  assert [v.aval.shape for v in shard_map.params["jaxpr"].invars[-4:-1]] == [(1, 19, 1, 8)] * 3


def test_splash_errors():
  with pytest.raises(ValueError, match="multiple of 128"):
    attention.make_attention_fn("splash", 3, 4, 3, block_size=64)
  with pytest.raises(ValueError, match="expected one of"):
    attention.make_attention_fn("flash", 3, 4, 3)
  qkv = random_qkv((4, 18, 2, 8))
  with pytest.raises(ValueError, match="sequence length 18"):
    attention.make_attention_fn("dense", 3, 4, 3)(*qkv, 0)
  with pytest.raises(ValueError, match="TPU kernel and this computation targets cpu"):
    attention.make_attention_fn("splash", 3, 4, 3)(*random_qkv((1, 19, 2, 8)), 0)
  qkv = random_qkv((4, 19, 3, 8))  # 3 heads over a tensor axis of 2
  with jax.set_mesh(mesh_222()), nn.logical_axis_rules(RULES):
    with pytest.raises(ValueError, match="heads=3 is not divisible"):
      attention.make_attention_fn("splash", 3, 4, 3, interpret=True)(*qkv, 0)


def test_block_counts():
  # Full size: 1280 tokens = 10×10 blocks of 128; text = 2 blocks, each image block = 4 image rows.
  assert attention.block_counts(256, 32, 11, 128) == {
      "row": (34, 100), "column": (27, 100), "conv": (40, 100), "causal": (55, 100),
      "column_raster": (55, 100)}
  # The counts are the blocks splash's own metadata marks as non-empty (the rest are skipped).
  t, g, k = 16, 16, 5
  counts = attention.block_counts(t, g, k, 128)
  kernels = attention.make_splash_kernels(t, g, k, 128, heads=2)
  for name in attention.PATTERNS:
    block_mask = np.asarray(kernels[name].fwd_mask_info.block_mask)
    assert block_mask.shape[:2] == (1, 3)  # one copy for all heads; 3 query blocks
    assert (block_mask > 0).sum() == counts[name][0]
  assert counts["row"] == (6, 9) and counts["column"] == (5, 9) and counts["conv"] == (6, 9)
  assert counts["causal"] == (6, 9)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu")
def test_splash_compiles_for_tpu_topology():
  from mmjax import sharding  # pylint: disable=import-outside-toplevel
  from mmjax.configs import common  # pylint: disable=import-outside-toplevel
  mesh = sharding.topology_mesh("v5e:2x2", common.mesh_config(data=2, fsdp=1, tensor=2))
  t, g, k = 256, 32, 11
  spec = heads_sharding(mesh)
  arg = jax.ShapeDtypeStruct((4, t + g * g, 4, 64), jnp.bfloat16, sharding=spec)
  loss = scanned_stack(attention.make_attention_fn("splash", t, g, k), 8)
  compiled = sharding.compile_for_mesh(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), (arg,) * 3,
                                       mesh, RULES)
  hlo = compiled.as_text()
  # Forward and backward (dq, dkv) Mosaic kernels on per-device [2 examples, 2 heads, 1280, 64].
  for kernel in ("splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv"):
    assert kernel in hlo
  assert "bf16[2,2,1280,64]" in hlo
