"""Shared transformer blocks: attention/LayerNorm/activations against numpy, masks, scan/remat layouts, axes."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mmjax import sharding
from mmjax.configs import common
from mmjax.models import layers

WIDTH, HEADS, MLP_DIM, LENGTH = 16, 2, 32, 6


# Keys use the "rbg" PRNG: compiling threefry's bit generator costs seconds per call on this CPU.
def key(seed):
  return jax.random.key(seed, impl="rbg")


def normal(shape, seed=0, scale=1.0):
  return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


def random_params(module, *inputs, seed=0):
  """Random values for every param (LayerNorm gains and biases too), drawn with numpy."""
  abstract = nn.unbox(jax.eval_shape(lambda: module.init(key(0), *inputs))["params"])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda leaf: rng.normal(scale=0.3, size=leaf.shape).astype(np.float32), abstract)


def numpy_attention(q, k, v, mask=None, bias=None):
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
  if bias is not None:
    logits = logits + bias
  if mask is not None:
    logits = np.where(mask, logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", weights, v)


def test_dot_product_attention_matches_numpy():
  q, k, v = (normal((2, LENGTH, HEADS, 8), seed) for seed in range(3))
  bias = normal((1, HEADS, LENGTH, LENGTH), 3)
  mask = np.random.default_rng(4).uniform(size=(2, 1, LENGTH, LENGTH)) < 0.6
  mask[..., 0] = True  # every query sees at least one key
  np.testing.assert_allclose(layers.dot_product_attention(q, k, v), numpy_attention(q, k, v), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(layers.dot_product_attention(q, k, v, mask=mask, bias=bias),
                             numpy_attention(q, k, v, mask, bias), rtol=1e-5, atol=1e-6)
  causal = np.asarray(layers.causal_mask(4))[0, 0]
  np.testing.assert_array_equal(causal, np.tril(np.ones((4, 4), bool)))


def test_activations_and_layer_norm_match_numpy():
  x = np.linspace(-4, 4, 33, dtype=np.float32)
  np.testing.assert_allclose(layers.quick_gelu(x), x / (1 + np.exp(-1.702 * x)), rtol=1e-6, atol=1e-7)
  exact = np.array([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
  np.testing.assert_allclose(layers.activation_fn("gelu")(x), exact, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"activation='relu'"):
    layers.activation_fn("relu")

  x = normal((3, WIDTH), scale=5.0) + 10.0
  norm = layers.LayerNorm(dtype=jnp.bfloat16)
  params = {"scale": normal((WIDTH,), 1), "bias": normal((WIDTH,), 2)}
  y = norm.apply({"params": params}, jnp.asarray(x, jnp.bfloat16))
  assert y.dtype == jnp.bfloat16
  x_bf16 = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
  expected = ((x_bf16 - x_bf16.mean(-1, keepdims=True)) / np.sqrt(x_bf16.var(-1, keepdims=True) + 1e-5)
              * params["scale"] + params["bias"])
  np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=2e-2, atol=2e-2)  # bf16 output
  y32 = layers.LayerNorm(dtype=jnp.float32).apply({"params": params}, x_bf16.astype(np.float32))
  np.testing.assert_allclose(y32, expected, rtol=1e-5, atol=1e-5)


def test_block_matches_a_numpy_forward():
  x = normal((2, LENGTH, WIDTH))
  block = layers.ResidualBlock(heads=HEADS, mlp_dim=MLP_DIM, activation="quick_gelu", dtype=jnp.float32)
  mask = layers.causal_mask(LENGTH)
  params = random_params(block, x, mask)
  got = jax.jit(lambda p: block.apply({"params": p}, x, mask))(params)

  def ln(h, p):
    return (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5) * p["scale"] + p["bias"]

  attn, mlp = params["attn"], params["mlp"]
  h = ln(x, params["ln_1"])
  q, k, v = (np.einsum("blw,whd->blhd", h, attn[n]["kernel"]) + attn[n]["bias"] for n in ("query", "key", "value"))
  attended = numpy_attention(q, k, v, np.asarray(mask))
  x1 = x + np.einsum("blhd,hdw->blw", attended, attn["out"]["kernel"]) + attn["out"]["bias"]
  hidden = ln(x1, params["ln_2"]) @ mlp["fc"]["kernel"] + mlp["fc"]["bias"]
  hidden = hidden / (1 + np.exp(-1.702 * hidden))
  expected = x1 + hidden @ mlp["proj"]["kernel"] + mlp["proj"]["bias"]
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_causal_mask_keeps_the_future_out():
  model = layers.Transformer(layers=2, heads=HEADS, mlp_dim=MLP_DIM, dtype=jnp.float32)
  x = normal((1, LENGTH, WIDTH))
  mask = layers.causal_mask(LENGTH)
  params = random_params(model, x, mask)
  run = jax.jit(lambda p, h: model.apply({"params": p}, h, mask))
  changed = x.copy()
  changed[:, 3] += normal((WIDTH,), 1)  # not a constant shift, which LayerNorm would remove
  before, after = run(params, x), run(params, changed)
  np.testing.assert_allclose(after[:, :3], before[:, :3], rtol=1e-6, atol=1e-6)
  assert np.abs(after[0, 3:] - before[0, 3:]).max(axis=-1).min() > 1e-3  # every later position moves


def test_scan_remat_and_unscanned_layouts_agree():
  x = normal((2, LENGTH, WIDTH))
  mask = layers.causal_mask(LENGTH)
  fields = dict(layers=2, heads=HEADS, mlp_dim=MLP_DIM, activation="gelu", dtype=jnp.float32)
  plain = layers.Transformer(**fields)
  params = random_params(plain, x, mask)
  assert sorted(params) == ["blocks_0", "blocks_1"]
  stacked = layers.stack_layers(params)
  assert list(stacked) == ["blocks"] and stacked["blocks"]["attn"]["query"]["kernel"].shape == (2, WIDTH, HEADS, 8)
  restored = layers.unstack_layers(stacked)
  jax.tree.map(np.testing.assert_array_equal, restored, params)

  def loss(model, p):
    return jnp.sum(jnp.sin(model.apply({"params": p}, x, mask)))

  value, grads = jax.jit(jax.value_and_grad(lambda p: loss(plain, p)))(params)
  for scan_layers, remat in ((True, True), (False, True)):  # scan alone: tests/models/test_clip_parity.py
    model = layers.Transformer(**fields, scan_layers=scan_layers, remat=remat)
    p = stacked if scan_layers else params
    value_other, grads_other = jax.jit(jax.value_and_grad(lambda q, m=model: loss(m, q)))(p)
    np.testing.assert_allclose(value_other, value, rtol=1e-5)
    grads_other = layers.unstack_layers(grads_other) if scan_layers else grads_other
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads_other, grads)
  assert np.abs(grads["blocks_0"]["attn"]["query"]["kernel"]).max() > 0

  with pytest.raises(ValueError, match=r"layers \[0, 2\]"):
    layers.stack_layers({"blocks_0": params["blocks_0"], "blocks_2": params["blocks_1"]})


def test_output_index_reads_one_position_as_the_full_stack_would():
  """The unscanned last block computes only the read position: same values and gradients as
  running every position and gathering, for causal and unmasked stacks, remat and scanned too."""
  x = normal((3, LENGTH, WIDTH))
  index = jnp.array([5, 0, 2])
  rows = jnp.arange(3)
  fields = dict(layers=2, heads=HEADS, mlp_dim=MLP_DIM, activation="gelu", dtype=jnp.float32)
  plain = layers.Transformer(**fields)
  for mask in (layers.causal_mask(LENGTH), None):
    params = random_params(plain, x, mask)

    def full(p, mask=mask):
      return plain.apply({"params": p}, x, mask)[rows, index]

    expected, expected_grads = jax.jit(jax.value_and_grad(lambda p: jnp.sum(jnp.sin(full(p)))))(params)
    for scan_layers, remat in ((False, False), (False, True), (True, False)):
      model = layers.Transformer(**fields, scan_layers=scan_layers, remat=remat)
      p = layers.stack_layers(params) if scan_layers else params
      read = jax.jit(lambda q, m=model, mask=mask: m.apply({"params": q}, x, mask, output_index=index))(p)
      assert read.shape == (3, WIDTH)
      np.testing.assert_allclose(read, full(params), rtol=1e-5, atol=1e-6)
      value, grads = jax.jit(jax.value_and_grad(
          lambda q, m=model, mask=mask: jnp.sum(jnp.sin(m.apply({"params": q}, x, mask, output_index=index)))))(p)
      np.testing.assert_allclose(value, expected, rtol=1e-5)
      grads = layers.unstack_layers(grads) if scan_layers else grads
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads, expected_grads)
  # The last block's queries see only their own row of the mask: position 0 attends to itself alone.
  causal = layers.query_rows(layers.causal_mask(LENGTH), index)
  assert causal.shape == (3, 1, 1, LENGTH)
  np.testing.assert_array_equal(causal[:, 0, 0].sum(-1), index + 1)


def test_every_param_has_logical_axes_and_shards_by_the_rules():
  x = jnp.zeros((8, LENGTH, WIDTH))
  for scan_layers in (False, True):
    model = layers.Transformer(layers=2, heads=HEADS, mlp_dim=MLP_DIM, scan_layers=scan_layers,
                               dtype=jnp.float32)
    boxed = jax.eval_shape(lambda m=model: m.init(key(0), x)["params"])
    boxes = jax.tree.leaves(boxed, is_leaf=lambda b: isinstance(b, nn.LogicallyPartitioned))
    assert boxes and all(isinstance(b, nn.LogicallyPartitioned) for b in boxes)
    assert all(len(b.names) == b.value.ndim for b in boxes)
    assert all((b.names[0] == "layers") == scan_layers for b in boxes)
  specs = sharding.logical_specs(boxed)["blocks"]
  assert tuple(specs["attn"]["query"]["kernel"]) == ("layers", "embed", "heads", "kv")
  assert tuple(specs["attn"]["out"]["kernel"]) == ("layers", "heads", "kv", "embed")
  assert tuple(specs["mlp"]["fc"]["kernel"]) == ("layers", "embed", "mlp")
  assert tuple(specs["ln_1"]["scale"]) == ("layers", "embed")

  mesh = sharding.create_mesh(common.mesh_config(data=2, fsdp=2, tensor=2))
  rules = common.DEFAULT_LOGICAL_AXIS_RULES
  model = layers.Transformer(layers=2, heads=HEADS, mlp_dim=MLP_DIM, scan_layers=True, dtype=jnp.float32)
  params, _ = sharding.create_sharded_state(lambda rng: model.init(rng, x)["params"], mesh, rules, key(0))
  blocks = params["blocks"]
  assert blocks["attn"]["query"]["kernel"].sharding.spec == P(None, "fsdp", "tensor", None)
  assert blocks["mlp"]["proj"]["kernel"].sharding.spec == P(None, "tensor", "fsdp")
  inputs = normal((8, LENGTH, WIDTH))
  with sharding.mesh_and_rules(mesh, rules):
    sharded = jax.jit(lambda p, h: model.apply({"params": p}, h, layers.causal_mask(LENGTH)))(params, inputs)
  expected = jax.jit(lambda p, h: model.apply({"params": p}, h, layers.causal_mask(LENGTH)))(
      jax.device_get(params), inputs)
  np.testing.assert_allclose(sharded, expected, rtol=1e-4, atol=1e-5)
