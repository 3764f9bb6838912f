"""DALL·E transformer: loss, KV-cache decoding against the full forward, layouts, shardings, configs."""

import importlib
import importlib.util
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from mmjax import sharding
from mmjax.configs import common
from mmjax.errors import ConfigError, DataError
from mmjax.models import attention, dalle, layers
from mmjax.sharding import rules as rules_lib

# 6 layers: row, column, row, row, row, conv — every pattern appears. 3×3 conv window on a 4×4 grid.
TINY = dict(text_vocab_size=50, text_length=6, image_vocab_size=30, grid_size=4, width=32, num_layers=6,
            num_heads=4, mlp_dim=64, kernel_size=3, remat=False, dtype=jnp.float32)
SMALL = {**TINY, "num_layers": 2}  # column, conv: enough where the schedule is not the point (compiles faster)
TEXT_ROWS = 50 + 6
VOCAB = TEXT_ROWS + 30


def key(seed):
  return jax.random.key(seed, impl="rbg")  # threefry compiles slowly on this CPU


def random_params(model, seed=0, scale=0.3):
  """Random values for every param (LayerNorms, biases and the zero-initialised head too)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda leaf: rng.normal(scale=scale, size=leaf.shape).astype(np.float32),
                      dalle.abstract_params(model))


def tokens(batch=2, seed=0, words=3):
  """Text rows in the tokenizer's "dalle" layout (pad id = vocab + position) and random image codes."""
  rng = np.random.default_rng(seed)
  text = np.tile(np.arange(50, 56, dtype=np.int32), (batch, 1))
  text[:, :words] = rng.integers(3, 50, (batch, words))
  return text, rng.integers(0, 30, (batch, 16)).astype(np.int32)


def test_init_layout_first_loss_and_a_few_adam_steps():
  model = dalle.Dalle(**{**SMALL, "remat": True})  # scanned and rematerialised, as at full size
  text, image = tokens(batch=4, seed=8)
  params = nn.unbox(jax.jit(model.init)(key(0), text, image)["params"])
  assert params["text_embedding"]["embedding"].shape == (TEXT_ROWS, 32)  # a pad row per text position
  assert params["image_embedding"]["embedding"].shape == (30, 32)
  assert params["image_rows"].shape == params["image_columns"].shape == (4, 32)
  assert params["head"]["kernel"].shape == (32, VOCAB)
  assert params["blocks"]["attn"]["query"]["kernel"].shape == (2, 32, 4, 8)  # stacked on `layers`
  assert params["blocks"]["mlp"]["fc"]["kernel"].shape == (2, 32, 64)
  optimizer = optax.adam(3e-3)

  @jax.jit
  def train_step(params, opt_state):
    def loss_fn(p):
      predictions = model.apply({"params": p}, text, image.reshape(4, 4, 4),  # codes may come as a grid
                                method=dalle.Dalle.prediction_logits)
      return dalle.dalle_loss(predictions, text, image)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, metrics

  opt_state = optimizer.init(params)
  history = []
  for _ in range(40):
    params, opt_state, metrics = train_step(params, opt_state)
    history.append(metrics)
  # The head starts at zero, so the first predictions are uniform over each modality's range.
  first = history[0]
  np.testing.assert_allclose(first["text_loss"], math.log(TEXT_ROWS), rtol=1e-6)
  np.testing.assert_allclose(first["image_loss"], math.log(30), rtol=1e-6)
  np.testing.assert_allclose(first["loss"], math.log(TEXT_ROWS) / 8 + 7 * math.log(30) / 8, rtol=1e-6)
  assert history[-1]["image_loss"] < 0.5 * first["image_loss"]
  assert history[-1]["text_loss"] < 0.5 * first["text_loss"]


def test_prediction_logits_are_the_joint_logits_the_loss_reads():
  """Training's head (each position through its own modality's columns) against the joint head sliced:
  same logits, same loss, same gradients, and the same params (a checkpoint serves both)."""
  model = dalle.Dalle(**SMALL)
  text, image = tokens(batch=3, seed=4)
  params = random_params(model, seed=4)
  assert jax.tree.structure(nn.unbox(model.init(key(0), text, image)["params"])) == jax.tree.structure(params)
  joint = model.apply({"params": params}, text, image)
  predictions = model.apply({"params": params}, text, image, method=dalle.Dalle.prediction_logits)
  assert predictions[0].shape == (3, 5, TEXT_ROWS) and predictions[1].shape == (3, 16, 30)
  for got, want in zip(predictions, dalle.split_logits(joint, 6, image_vocab_size=30)):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)

  def loss(p, joint_head):
    if joint_head:
      return dalle.dalle_loss(dalle.split_logits(model.apply({"params": p}, text, image), 6, 30), text, image)[0]
    return dalle.dalle_loss(model.apply({"params": p}, text, image, method=dalle.Dalle.prediction_logits),
                            text, image)[0]

  (joint_loss, joint_grads), (loss_, grads) = (jax.value_and_grad(loss)(params, flag) for flag in (True, False))
  np.testing.assert_allclose(loss_, joint_loss, rtol=1e-6)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(joint_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  # The text columns never see image positions' gradients and vice versa: both blocks are trained.
  head = np.asarray(grads["head"]["kernel"])
  assert np.abs(head[:, :TEXT_ROWS]).sum() > 0 and np.abs(head[:, TEXT_ROWS:]).sum() > 0


def test_loss_matches_its_definition():
  rng = np.random.default_rng(1)
  text, image = tokens(batch=3, seed=1)
  logits = rng.normal(scale=3.0, size=(3, 22, VOCAB)).astype(np.float32)
  loss_fn = jax.jit(lambda x: dalle.dalle_loss(dalle.split_logits(x, 6, image_vocab_size=30), text, image))
  loss, metrics = loss_fn(logits)

  def nll(row, target, lo, hi):  # -log softmax over the modality's slice [lo, hi)
    z = row[lo:hi].astype(np.float64)
    return np.log(np.exp(z - z.max()).sum()) + z.max() - z[target]

  # Position p predicts token p + 1: text positions 0..4 → text 1..5; positions 5..20 → image 0..15.
  text_nll = [nll(logits[b, p], text[b, p + 1], 0, TEXT_ROWS) for b in range(3) for p in range(5)]
  image_nll = [nll(logits[b, 5 + i], image[b, i], TEXT_ROWS, VOCAB) for b in range(3) for i in range(16)]
  np.testing.assert_allclose(metrics["text_loss"], np.mean(text_nll), rtol=1e-5)
  np.testing.assert_allclose(metrics["image_loss"], np.mean(image_nll), rtol=1e-5)
  np.testing.assert_allclose(loss, np.mean(text_nll) / 8 + 7 * np.mean(image_nll) / 8, rtol=1e-5)
  # The last position predicts nothing: changing its logits leaves the loss alone.
  logits[:, -1] += 100.0
  np.testing.assert_allclose(loss_fn(logits)[0], loss, rtol=1e-6)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_incremental_decoding_matches_the_full_forward(scan_layers):
  """Prefill the caption in one call, then one image token per call: the logits at every position
  equal the full forward's (f32, |Δ| ≤ 1e-5 on logits of order 1) in every layer's pattern."""
  assert attention.layer_patterns(6) == ("row", "column", "row", "row", "row", "conv")
  # The unscanned layout (blocks_0 …, a cache per block) with 3 layers: row, column, conv.
  model = dalle.Dalle(**TINY, scan_layers=True) if scan_layers else dalle.Dalle(**{**TINY, "num_layers": 3},
                                                                               scan_layers=False)
  params = random_params(model, seed=2)
  if not scan_layers:
    params = layers.unstack_layers(params)
  text, image = tokens(batch=2, seed=3)
  full = np.asarray(jax.jit(model.apply)({"params": params}, text, image))
  assert np.abs(full).max() > 1.0  # random weights give logits of order 1: the comparison means something

  step = jax.jit(lambda cache, t, index: dalle.decode_step(model, params, cache, t, index))
  cache = dalle.init_cache(model, batch=2)
  prefill, cache = step(cache, text, 0)
  decoded = [np.asarray(prefill)]
  for i in range(15):  # the last image token's own logits predict nothing and are not needed
    logits, cache = step(cache, image[:, i:i + 1], jnp.int32(6 + i))
    decoded.append(np.asarray(logits))
  decoded = np.concatenate(decoded, axis=1)
  np.testing.assert_allclose(decoded, full[:, :21], rtol=0, atol=1e-5)

  if not scan_layers:  # the same weights in the scanned layout give the same logits
    scanned = dalle.Dalle(**{**TINY, "num_layers": 3}, scan_layers=True)
    stacked = jax.jit(scanned.apply)({"params": layers.stack_layers(params)}, text, image)
    np.testing.assert_allclose(stacked, full, rtol=0, atol=1e-5)
    return
  # A prefill that crosses into the image (caption + 5 codes), then steps, agrees too.
  cache, sequence = dalle.init_cache(model, batch=2), np.concatenate([text, image], axis=1)
  logits, cache = step(cache, sequence[:, :11], 0)
  np.testing.assert_allclose(logits, full[:, :11], rtol=0, atol=1e-5)
  logits, cache = step(cache, sequence[:, 11:12], jnp.int32(11))
  np.testing.assert_allclose(logits, full[:, 11:12], rtol=0, atol=1e-5)
  # The step really reads the cache: against an empty cache the same token gives other logits.
  cold, _ = step(dalle.init_cache(model, batch=2), sequence[:, 11:12], jnp.int32(11))
  assert np.abs(np.asarray(cold) - full[:, 11:12]).max() > 0.1


def test_the_layer_masks_reach_the_logits():
  """One conv layer with a 1×1 window: a changed image token moves only its own position's logits
  (text never sees the image; other cells only see text and themselves)."""
  model = dalle.Dalle(**{**TINY, "num_layers": 1, "kernel_size": 1})  # one conv layer: each cell sees itself
  params = random_params(model, seed=4)
  text, image = tokens(batch=1, seed=5)
  run = jax.jit(lambda i: model.apply({"params": params}, text, i))
  base, changed = image.copy(), image.copy()
  changed[0, 5] = (image[0, 5] + 1) % 30
  a, b = np.asarray(run(base)), np.asarray(run(changed))
  moved = np.abs(a - b).max(axis=-1)[0]
  assert moved[6 + 5] > 1e-3                      # position of image token 5 itself
  assert moved[:6 + 5].max() == 0 and moved[6 + 6:].max() == 0  # nobody else sees it with a 1×1 window


def test_bf16_tracks_f32():
  model32, model16 = dalle.Dalle(**SMALL), dalle.Dalle(**{**SMALL, "dtype": jnp.bfloat16})
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(dalle.abstract_params(model16)))  # f32 params
  params = random_params(model32, seed=9, scale=0.1)
  text, image = tokens()
  run = lambda m: jax.jit(m.apply)({"params": params}, text, image)  # noqa: E731
  expected, got = np.asarray(run(model32)), run(model16)
  assert got.dtype == jnp.float32  # bf16 compute, f32 logits
  assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()


def test_params_shard_over_fsdp_and_tensor():
  model = dalle.Dalle(**SMALL)
  mesh = sharding.create_mesh(common.mesh_config(data=1, fsdp=4, tensor=2))
  rules = common.DEFAULT_LOGICAL_AXIS_RULES
  text, image = tokens(batch=4)
  init_fn = lambda rng: model.init(rng, text, image)["params"]  # noqa: E731
  boxes = jax.tree.leaves(jax.eval_shape(init_fn, key(0)), is_leaf=lambda b: isinstance(b, nn.LogicallyPartitioned))
  assert all(isinstance(b, nn.LogicallyPartitioned) for b in boxes)  # every param names its axes
  _, shardings = sharding.abstract_sharded_state(init_fn, mesh, rules, key(0))
  specs = {rules_lib.path_str(path): s.spec for path, s in jax.tree_util.tree_leaves_with_path(shardings)}
  expected_specs = {
      "text_embedding/embedding": P("tensor", "fsdp"), "image_embedding/embedding": P("tensor", "fsdp"),
      "text_positions": P(None, "fsdp"), "image_rows": P(None, "fsdp"),
      "blocks/attn/query/kernel": P(None, "fsdp", "tensor", None),
      "blocks/attn/out/kernel": P(None, "tensor", None, "fsdp"),
      "blocks/mlp/fc/kernel": P(None, "fsdp", "tensor"), "blocks/mlp/proj/kernel": P(None, "tensor", "fsdp"),
      "head/kernel": P("fsdp", "tensor"), "head/bias": P("tensor")}
  assert {name: specs[name] for name in expected_specs} == expected_specs
  values = random_params(model, seed=10)  # init's head is zero: random values make the comparison real
  run = lambda p: model.apply({"params": p}, text, image)  # noqa: E731
  with sharding.mesh_and_rules(mesh, rules):
    sharded = jax.jit(run)(jax.device_put(values, shardings))
  assert sharded.sharding.spec == P("fsdp", None, "tensor")  # logits: batch over fsdp, vocab over tensor
  expected = jax.jit(run)(values)
  assert np.abs(np.asarray(expected)).max() > 0.1
  np.testing.assert_allclose(sharded, expected, rtol=1e-4, atol=1e-5)


def test_model_config_round_trip_and_bad_fields():
  model = dalle.Dalle(**{**TINY, "dtype": jnp.bfloat16, "remat": True})
  config = dalle.model_config(model, source="test")
  assert config["kind"] == "dalle" and config["dtype"] == "bfloat16" and config["num_layers"] == 6
  rebuilt = dalle.from_model_config(json.loads(json.dumps(config)))
  assert dalle.model_config(rebuilt, source="test") == config
  assert dalle.from_model_config(config, dtype="float32").dtype == jnp.float32
  with pytest.raises(DataError, match=r"kind='clip'"):
    dalle.from_model_config({**config, "kind": "clip"})
  with pytest.raises(DataError, match=r"attention_kernel='flash'"):
    dalle.from_model_config({**config, "attention_kernel": "flash"})
  with pytest.raises(DataError, match=r"width=32 is not divisible by num_heads=5"):
    dalle.from_model_config({**config, "num_heads": 5})
  with pytest.raises(ValueError, match=r"expected \[batch, text_length=6\]"):
    model.init(key(0), np.zeros((1, 7), np.int32), np.zeros((1, 16), np.int32))


def _count(params):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def test_12b_config_has_12b_parameters_and_shards():
  config = importlib.import_module("mmjax.configs.dalle_12b").get_config()
  model = dalle.from_model_config(config.model)
  assert (model.width, model.num_heads, model.num_layers, model.sequence_length) == (3968, 62, 64, 1280)
  assert model.dtype == jnp.bfloat16 and model.param_dtype == jnp.float32 and model.scan_layers and model.remat
  assert model.attention_kernel == "splash"  # abstract_params traces with dense: the same params, any backend
  params = dalle.abstract_params(model)
  d, blocks = 3968, 64 * (12 * 3968 ** 2 + 13 * 3968)  # q/k/v/out 4d², MLP 8d², biases and LayerNorms 13d
  embeddings = (16384 + 256 + 8192 + 256 + 2 * 32) * d + 2 * d + (d + 1) * (16384 + 256 + 8192)
  assert _count(params) == blocks + embeddings == 12_293_849_088
  assert abs(_count(params) / 12e9 - 1) < 0.03
  # The config's mesh (fsdp over every device) divides every sharded dimension on 8 devices ...
  dense = model.clone(attention_kernel="dense")  # splash traces only for TPUs
  init_fn = lambda rng: dense.init(rng, jnp.zeros((8, 256), jnp.int32), jnp.zeros((8, 1024), jnp.int32))  # noqa
  mesh = sharding.create_mesh(config.mesh)
  abstract, _ = sharding.abstract_sharded_state(init_fn, mesh, config.logical_axis_rules, key(0))
  assert abstract["params"]["blocks"]["mlp"]["fc"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
  # ... and a tensor axis the 62 heads cannot split fails before anything compiles, naming the field.
  mesh = sharding.create_mesh(common.mesh_config(data=1, fsdp=2, tensor=4))
  with pytest.raises(ConfigError, match=r"heads=62\) is not divisible by mesh axis 'tensor' of size 4.*"
                                        r"config\.mesh\.ici\.tensor"):
    sharding.abstract_sharded_state(init_fn, mesh, config.logical_axis_rules, key(0))


@pytest.mark.parametrize("arg", ["shapes", "digits", "mnist"])
def test_tiny_configs_fit_the_encoded_tokens(arg):
  config = importlib.import_module("mmjax.configs.dalle_shapes").get_config(arg)
  encode = importlib.import_module("mmjax.configs.dvae_encode").get_config(arg)
  dvae = importlib.import_module("mmjax.configs.dvae_shapes").get_config(arg)
  model = dalle.from_model_config(config.model)
  assert config.trainer == "dalle" and config.data.name == arg
  assert model.text_length == config.data.text_length == encode.data.text_length == 32
  assert model.text_vocab_size == config.tokenizer.vocab_size == encode.tokenizer.vocab_size
  assert model.image_vocab_size == dvae.model.vocab_size == 512 and model.grid_size == 16
  assert attention.layer_patterns(model.num_layers) == ("row", "column", "row", "conv")
  assert 3e5 < _count(dalle.abstract_params(model)) < 6e5   # 406,432


@pytest.mark.slow  # ≈30 s: compiles a 6-layer model's gradient with Mosaic kernels for a TPU topology
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (compile-only TPU devices)")
def test_splash_model_gradient_compiles_for_a_tpu_slice():
  mesh = sharding.topology_mesh("v5e:2x2", common.mesh_config(data=1, fsdp=2, tensor=2))
  rules = common.DEFAULT_LOGICAL_AXIS_RULES
  model = dalle.Dalle(text_vocab_size=256, text_length=16, image_vocab_size=128, grid_size=8, width=256,
                      num_layers=6, num_heads=4, mlp_dim=1024, kernel_size=5, attention_kernel="splash")
  text, image = np.zeros((8, 16), np.int32), np.zeros((8, 64), np.int32)
  init_fn = lambda rng: model.clone(attention_kernel="dense").init(rng, text, image)["params"]  # noqa: E731
  abstract, _ = sharding.abstract_sharded_state(init_fn, mesh, rules, key(0))
  batch = sharding.batch_sharding(mesh, rules)
  inputs = [jax.ShapeDtypeStruct(x.shape, jnp.int32, sharding=batch) for x in (text, image)]

  def loss(params, text, image):
    predictions = model.apply({"params": params}, text, image, method=dalle.Dalle.prediction_logits)
    return dalle.dalle_loss(predictions, text, image)[0]

  hlo = sharding.compile_for_mesh(jax.jit(jax.grad(loss)), (abstract, *inputs), mesh, rules).as_text()
  for kernel in ("splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv"):  # the scanned blocks use splash
    assert kernel in hlo
