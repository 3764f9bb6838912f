"""dVAE module: shapes, likelihood / KL math against direct evaluation, gumbel path, shardings, configs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mmjax import sharding
from mmjax.configs import common
from mmjax.errors import DataError
from mmjax.models import dvae

# Keys use the "rbg" PRNG: compiling threefry's bit generator costs seconds per call on this CPU.
def key(seed):
  return jax.random.key(seed, impl="rbg")


TINY = dict(n_hid=16, n_blk_per_group=1, group_count=2, vocab_size=32, n_init=8, dtype=jnp.float32)


def abstract_init(model, image_size=8):
  images = jax.ShapeDtypeStruct((2, image_size, image_size, model.input_channels), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, temperature=1.0, rng=None,
                                             deterministic=True)["params"], images)


def init(model, image_size=8, seed=0):
  """Random params like dall_e's init (N(0, 1/fan_in) kernels) plus small random biases, drawn with
  numpy from the module's own param shapes: compiling the init on this CPU costs far more."""
  rng = np.random.default_rng(seed)
  def draw(leaf):
    if leaf.ndim == 4:
      return rng.normal(scale=1 / np.sqrt(np.prod(leaf.shape[:3])), size=leaf.shape).astype(np.float32)
    return rng.normal(scale=0.05, size=leaf.shape).astype(np.float32)
  return jax.tree.map(draw, nn.unbox(abstract_init(model, image_size)))


def apply(model, params, *args, method=None, **kwargs):
  return jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=method, **kwargs))(params, *args)


def random_images(shape, seed=0):
  return dvae.map_pixels(np.random.default_rng(seed).uniform(size=shape).astype(np.float32))


@pytest.mark.parametrize("fields, image_size", [
    (dict(n_hid=8, n_blk_per_group=1, group_count=2, vocab_size=16, n_init=8), 8),
    (dict(n_hid=16, n_blk_per_group=2, group_count=3, vocab_size=32, n_init=12, input_channels=1,
          output_channels=1), 16),
    (dict(n_hid=4, n_blk_per_group=1, group_count=4, vocab_size=24, n_init=64), 16),
])
def test_shapes_and_output_dtypes(fields, image_size):
  model = dvae.DVAE(dtype=jnp.bfloat16, **fields)
  params = init(model, image_size)
  images = random_images((2, image_size, image_size, model.input_channels))
  def run(p, x):  # one compile for both paths
    logits, stats = model.apply({"params": p}, x, temperature=0.5, rng=key(1))
    return logits, stats, model.apply({"params": p}, x, method=dvae.DVAE.encode_tokens)

  logits, stats, tokens = jax.jit(run)(params, images)
  grid = image_size // 2 ** (model.group_count - 1)
  assert logits.shape == (2, grid, grid, model.vocab_size) and logits.dtype == jnp.float32
  assert stats.shape == (2, image_size, image_size, 2 * model.output_channels) and stats.dtype == jnp.float32
  blocks = [name for name in params["encoder"] if name.startswith("group_")]
  assert len(blocks) == model.group_count * model.n_blk_per_group
  assert params["encoder"]["input"]["kernel"].shape == (7, 7, model.input_channels, model.n_hid)
  assert params["decoder"]["input"]["kernel"].shape == (1, 1, model.vocab_size, model.n_init)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  np.testing.assert_array_equal(tokens, np.argmax(logits, axis=-1))


def test_bf16_compute_tracks_f32():
  model32 = dvae.DVAE(**TINY)
  model16 = dvae.DVAE(**{**TINY, "dtype": jnp.bfloat16})
  params = init(model32, 8)
  images = random_images((2, 8, 8, 3))
  logits32 = apply(model32, params, images, method=dvae.DVAE.encode)
  logits16 = apply(model16, params, images, method=dvae.DVAE.encode)
  assert np.abs(logits16 - logits32).max() / np.abs(logits32).max() < 0.05


def test_bad_inputs_name_the_shape():
  model = dvae.DVAE(**TINY)
  params = init(model, 8)
  with pytest.raises(ValueError, match=r"not divisible by 2"):
    model.apply({"params": params}, jnp.zeros((1, 7, 8, 3)), method=dvae.DVAE.encode)
  with pytest.raises(ValueError, match=r"\[batch, height, width, 3\]"):
    model.apply({"params": params}, jnp.zeros((1, 8, 8, 4)), method=dvae.DVAE.encode)
  with pytest.raises(ValueError, match=r"\[batch, height, width, 32\]"):
    model.apply({"params": params}, jnp.zeros((1, 4, 4, 31)), method=dvae.DVAE.decode)


def test_logit_laplace_nll_matches_the_density():
  rng = np.random.default_rng(0)
  location = rng.normal(size=(2, 3, 4, 3))
  log_scale = rng.normal(scale=0.5, size=(2, 3, 4, 3))
  x = rng.uniform(0.1, 0.9, size=(2, 3, 4, 3))
  stats = np.concatenate([location, log_scale], axis=-1).astype(np.float32)
  # Direct evaluation of p(x) = exp(-|logit(x) - mu| / b) / (2 b x (1 - x)).
  b = np.exp(log_scale)
  density = np.exp(-np.abs(np.log(x / (1 - x)) - location) / b) / (2 * b * x * (1 - x))
  expected = -np.log(density).reshape(2, -1).sum(-1)
  got = dvae.logit_laplace_nll(jnp.asarray(stats), jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_logit_laplace_is_a_density_on_the_unit_interval():
  x = np.linspace(1e-6, 1 - 1e-6, 400_001)
  stats = np.zeros((x.size, 1, 1, 2), np.float32)
  stats[..., 0], stats[..., 1] = 0.7, -0.4
  nll = dvae.logit_laplace_nll(jnp.asarray(stats), jnp.asarray(x.reshape(-1, 1, 1, 1), jnp.float32))
  assert abs(np.trapezoid(np.exp(-np.asarray(nll, np.float64)), x) - 1) < 2e-3


def test_logit_laplace_nll_checks_target_shape():
  with pytest.raises(ValueError, match=r"do not match stats"):
    dvae.logit_laplace_nll(jnp.zeros((1, 2, 2, 6)), jnp.full((1, 2, 2, 6), 0.5))


def test_kl_to_uniform():
  vocab = 64
  np.testing.assert_allclose(dvae.kl_to_uniform(jnp.zeros((2, 3, 3, vocab))), 0.0, atol=1e-5)
  one_hot = 1e4 * jax.nn.one_hot(jnp.arange(18).reshape(2, 3, 3) % vocab, vocab)
  np.testing.assert_allclose(dvae.kl_to_uniform(one_hot), 9 * np.log(vocab), rtol=1e-5)
  logits = np.random.default_rng(0).normal(size=(2, 3, 3, vocab))
  q = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  expected = (q * np.log(q * vocab)).sum(-1).reshape(2, -1).sum(-1)
  np.testing.assert_allclose(dvae.kl_to_uniform(jnp.asarray(logits, jnp.float32)), expected, rtol=1e-4)


def test_gaussian_nll_matches_the_density():
  rng = np.random.default_rng(0)
  location, x = rng.normal(size=(2, 3, 4, 3)), rng.uniform(0.1, 0.9, size=(2, 3, 4, 3))
  stats = np.concatenate([location, rng.normal(size=location.shape)], axis=-1).astype(np.float32)
  scale = 0.1
  mean = 1 / (1 + np.exp(-location))
  density = np.exp(-(x - mean) ** 2 / (2 * scale ** 2)) / (scale * np.sqrt(2 * np.pi))
  got = dvae.gaussian_nll(jnp.asarray(stats), jnp.asarray(x, jnp.float32), scale)
  np.testing.assert_allclose(got, -np.log(density).reshape(2, -1).sum(-1), rtol=1e-5)
  with pytest.raises(ValueError, match=r"do not match stats"):
    dvae.gaussian_nll(jnp.zeros((1, 2, 2, 6)), jnp.full((1, 2, 2, 6), 0.5), scale)


def test_usage_kl_penalises_collapse_not_confidence():
  vocab = 16
  spread = 1e4 * jax.nn.one_hot(jnp.arange(64) % vocab, vocab).reshape(4, 4, 4, vocab)
  np.testing.assert_allclose(dvae.usage_kl_to_uniform(spread), 0.0, atol=1e-5)
  collapsed = 1e4 * jax.nn.one_hot(jnp.full((4, 4, 4), 3), vocab)
  np.testing.assert_allclose(dvae.usage_kl_to_uniform(collapsed), np.log(vocab), rtol=1e-5)
  logits = np.random.default_rng(0).normal(size=(2, 3, 3, vocab))
  q = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  mean_q = q.reshape(-1, vocab).mean(0)
  np.testing.assert_allclose(dvae.usage_kl_to_uniform(jnp.asarray(logits, jnp.float32)),
                             (mean_q * np.log(mean_q * vocab)).sum(), rtol=1e-4)


def test_reconstruct_pixels_inverts_the_pixel_map():
  images = np.random.default_rng(0).uniform(size=(2, 4, 4, 3)).astype(np.float32)
  mapped = dvae.map_pixels(images)
  stats = jnp.concatenate([jnp.log(mapped / (1 - mapped)), jnp.zeros_like(mapped)], axis=-1)
  np.testing.assert_allclose(dvae.reconstruct_pixels(stats), images, atol=1e-5)
  np.testing.assert_allclose(dvae.unmap_pixels(jnp.array([0.0, 0.5, 1.0])), [0.0, 0.5, 1.0])


def test_codebook_perplexity_and_usage():
  vocab = 16
  uniform_hard = 50 * jax.nn.one_hot(jnp.arange(64) % vocab, vocab).reshape(4, 4, 4, vocab)
  np.testing.assert_allclose(dvae.codebook_perplexity(uniform_hard, hard=True), vocab, rtol=1e-5)
  np.testing.assert_allclose(dvae.codebook_perplexity(uniform_hard), vocab, rtol=1e-4)
  single = 50 * jax.nn.one_hot(jnp.full((2, 3, 3), 5), vocab)
  np.testing.assert_allclose(dvae.codebook_perplexity(single, hard=True), 1.0, rtol=1e-5)
  np.testing.assert_allclose(dvae.codebook_usage(single), 1 / vocab)
  np.testing.assert_allclose(dvae.codebook_usage(uniform_hard), 1.0)


def test_gumbel_softmax_samples_the_softmax():
  probs = np.array([0.5, 0.3, 0.15, 0.05])
  logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (20_000, 4))
  samples = dvae.gumbel_softmax(logits, 1.0, key(0))
  np.testing.assert_allclose(samples.sum(-1), 1.0, rtol=1e-5)
  frequencies = np.bincount(np.argmax(samples, -1), minlength=4) / 20_000
  np.testing.assert_allclose(frequencies, probs, atol=0.015)


def test_gumbel_path_at_tiny_temperature_matches_argmax_path():
  model = dvae.DVAE(**TINY)
  params = init(model, 8)
  # Scale the logits so their margins dwarf the gumbel noise: the sample is then the argmax.
  params["encoder"]["output"]["kernel"] = params["encoder"]["output"]["kernel"] * 1e5
  images = random_images((2, 8, 8, 3))
  logits, stats_argmax = apply(model, params, images, temperature=1.0, rng=None, deterministic=True)
  top2 = np.sort(np.asarray(logits), axis=-1)[..., -2:]
  assert (top2[..., 1] - top2[..., 0]).min() > 30  # gumbel noise differences beyond 30 have p < 1e-12
  sample = jax.jit(lambda p, t: model.apply({"params": p}, images, temperature=t, rng=key(3)))
  _, stats_gumbel = sample(params, 1e-3)
  np.testing.assert_allclose(stats_gumbel, stats_argmax, rtol=1e-4, atol=1e-4)
  _, stats_warm = sample(params, 1e4)
  assert np.abs(stats_warm - stats_argmax).max() > 1e-2  # a high temperature decodes different codes


def test_remat_gives_the_same_values_and_gradients():
  images = random_images((2, 4, 4, 3))
  fields = {**TINY, "group_count": 1, "n_blk_per_group": 2}
  plain, remat = dvae.DVAE(**fields), dvae.DVAE(**fields, remat=True)
  params = init(plain, 4)

  def loss(model, p):
    logits, stats = model.apply({"params": p}, images, temperature=0.5, rng=key(2))
    return jnp.mean(dvae.logit_laplace_nll(stats, images) + 0.1 * dvae.kl_to_uniform(logits))

  value, grads = jax.jit(jax.value_and_grad(lambda p: loss(plain, p)))(params)
  value_remat, grads_remat = jax.jit(jax.value_and_grad(lambda p: loss(remat, p)))(params)
  np.testing.assert_allclose(value_remat, value, rtol=1e-5)
  for g, g_remat in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_remat)):
    np.testing.assert_allclose(g_remat, g, rtol=1e-3, atol=1e-6)
  assert np.abs(grads["encoder"]["input"]["kernel"]).max() > 0  # gradients reach the encoder


def test_params_are_sharded_by_their_logical_axes():
  model = dvae.DVAE(**{**TINY, "n_hid": 32})  # every conv_out divisible by 8
  mesh = sharding.create_mesh(common.mesh_config(data=1, fsdp=8))
  images = jnp.zeros((8, 8, 8, 3))

  def init_fn(rng):
    return model.init(rng, images, temperature=1.0, rng=None, deterministic=True)["params"]

  boxed = jax.eval_shape(init_fn, key(0))
  assert tuple(sharding.logical_specs(boxed)["encoder"]["group_1_block_1"]["conv_2"]["kernel"]) == (
      None, None, "conv_in", "conv_out")
  params, shardings = sharding.create_sharded_state(init_fn, mesh, common.DEFAULT_LOGICAL_AXIS_RULES,
                                                    key(0))
  conv = params["encoder"]["group_2_block_1"]["conv_1"]
  assert conv["kernel"].sharding.spec == P(None, None, None, "fsdp")
  assert conv["bias"].sharding.spec == P("fsdp")
  assert conv["kernel"].addressable_shards[0].data.shape == (3, 3, 32, 2)  # 16 output channels / 8
  assert params["decoder"]["output"]["kernel"].sharding.spec == P(None, None, None, None)
  assert shardings["decoder"]["input"]["kernel"].spec == P(None, None, None, "fsdp")
  # The sharded params run under jit with the batch sharded over the mesh.
  with sharding.mesh_and_rules(mesh, common.DEFAULT_LOGICAL_AXIS_RULES):
    logits = jax.jit(lambda p, x: model.apply({"params": p}, x, method=dvae.DVAE.encode))(
        params, random_images((8, 8, 8, 3)))
  expected = apply(model, jax.device_get(params), random_images((8, 8, 8, 3)), method=dvae.DVAE.encode)
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


def test_model_config_round_trip():
  model = dvae.DVAE(n_hid=32, n_blk_per_group=3, group_count=3, vocab_size=100, n_init=16,
                    dtype=jnp.bfloat16, remat=True)
  config = dvae.model_config(model, parts=["encoder"])
  assert config["kind"] == "dvae" and config["dtype"] == "bfloat16" and config["parts"] == ["encoder"]
  rebuilt = dvae.from_model_config(config)
  assert dvae.model_config(rebuilt, parts=["encoder"]) == config
  assert rebuilt.dtype == jnp.bfloat16 and rebuilt.n_blk_per_group == 3 and rebuilt.remat
  assert dvae.from_model_config(config, dtype="float32").dtype == jnp.float32
  with pytest.raises(DataError, match=r"kind='clip'"):
    dvae.from_model_config({**config, "kind": "clip"})
  with pytest.raises(DataError, match=r"unknown fields \['n_heads'\]"):
    dvae.from_model_config({**config, "n_heads": 4})
  with pytest.raises(DataError, match=r"dtype='float13'"):
    dvae.from_model_config({**config, "dtype": "float13"})
