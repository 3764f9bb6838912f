"""CLIP module: outputs, temperature, end-of-text pooling, bf16, shardings, configs (tiny sizes)."""

import importlib
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mmjax import sharding
from mmjax.configs import common
from mmjax.errors import DataError
from mmjax.models import clip

TINY = dict(embed_dim=16, image_size=16, patch_size=8, vision_width=32, vision_layers=2, vision_heads=2,
            vision_mlp_dim=64, context_length=8, vocab_size=64, text_width=32, text_layers=2, text_heads=4,
            text_mlp_dim=48, dtype=jnp.float32)
EOT = TINY["vocab_size"] - 1


def key(seed):
  return jax.random.key(seed, impl="rbg")  # threefry compiles slowly on this CPU


def random_params(model, seed=0):
  """Random values for every param (LayerNorm gains, biases, the logit scale too), drawn with numpy."""
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda leaf: rng.normal(scale=0.3, size=leaf.shape).astype(np.float32),
                        clip.abstract_params(model))
  params["logit_scale"] = np.float32(math.log(20.0))
  return params


def inputs(batch=2, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, 16, 16, 3)).astype(np.float32)
  tokens = rng.integers(1, EOT - 1, (batch, 8)).astype(np.int32)
  for row, end in enumerate(rng.integers(2, 8, batch)):
    tokens[row, end] = EOT
    tokens[row, end + 1:] = 0
  return images, tokens


def test_init_outputs_and_temperature():
  model = clip.CLIP(**{**TINY, "dtype": jnp.bfloat16})
  images, tokens = inputs()
  variables = jax.jit(model.init)(key(0), images, tokens)
  params = nn.unbox(variables["params"])
  assert sorted(params) == ["logit_scale", "text", "visual"]
  np.testing.assert_allclose(params["logit_scale"], math.log(1 / 0.07), rtol=1e-6)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  image_embeddings, text_embeddings, scale = jax.jit(model.apply)({"params": params}, images, tokens)
  assert image_embeddings.shape == text_embeddings.shape == (2, 16)
  assert image_embeddings.dtype == text_embeddings.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(image_embeddings, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(text_embeddings, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(scale, 1 / 0.07, rtol=1e-5)
  assert params["visual"]["patch_embedding"]["kernel"].shape == (8, 8, 3, 32)
  assert "bias" not in params["visual"]["patch_embedding"]
  assert params["visual"]["positional_embedding"].shape == (5, 32)  # class token + 2×2 patches


def test_logits_are_scaled_cosines_and_the_scale_is_capped():
  model = clip.CLIP(**TINY)
  params = random_params(model)
  images, tokens = inputs(batch=3)

  @jax.jit
  def run(p):
    features = (model.apply({"params": p}, images, method=clip.CLIP.encode_image),
                model.apply({"params": p}, tokens, method=clip.CLIP.encode_text))
    return features, model.apply({"params": p}, images, tokens, method=clip.CLIP.logits)

  (image_features, text_features), logits = run(params)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  np.testing.assert_allclose(logits, 20.0 * unit(image_features) @ unit(text_features).T, rtol=1e-5, atol=1e-5)
  assert np.abs(logits).max() > 1.0  # not trivially zero

  capped = {**params, "logit_scale": np.float32(math.log(500.0))}
  _, capped_logits = run(capped)
  np.testing.assert_allclose(capped_logits, logits * 100.0 / 20.0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(clip.clamp_logit_scale(capped)["logit_scale"], math.log(100.0), rtol=1e-6)
  assert clip.clamp_logit_scale(params)["logit_scale"] == params["logit_scale"]


def test_text_features_come_from_the_end_of_text_token():
  model = clip.CLIP(**TINY)
  params = random_params(model, seed=1)
  encode = jax.jit(lambda t: model.apply({"params": params}, t, method=clip.CLIP.encode_text))
  tokens = np.array([[5, 9, 12, EOT, 0, 0, 0, 0]], np.int32)
  base = encode(tokens)
  after_end = tokens.copy()
  after_end[0, 4:] = [7, 8, 9, 10]  # causal: what follows the end token cannot matter
  np.testing.assert_allclose(encode(after_end), base, rtol=1e-6, atol=1e-6)
  before_end = tokens.copy()
  before_end[0, 1] = 30
  assert np.abs(encode(before_end) - base).max() > 1e-3
  moved_end = np.array([[5, 9, 12, 3, EOT, 0, 0, 0]], np.int32)
  assert np.abs(encode(moved_end) - base).max() > 1e-3
  short = jax.jit(lambda t: model.apply({"params": params}, t, method=clip.CLIP.encode_text))(tokens[:, :4])
  np.testing.assert_allclose(short, base, rtol=1e-5, atol=1e-6)  # shorter rows use the first positions


def test_bf16_compute_tracks_f32():
  images, tokens = inputs()
  model32, model16 = clip.CLIP(**TINY), clip.CLIP(**{**TINY, "dtype": jnp.bfloat16})
  params = random_params(model32, seed=2)
  run = lambda m: jax.jit(lambda p: m.apply({"params": p}, images, tokens))(params)  # noqa: E731
  for got, expected in zip(run(model16)[:2], run(model32)[:2]):
    assert got.dtype == jnp.float32
    assert np.abs(np.asarray(got) - expected).max() < 0.05


def test_bad_inputs_and_fields_name_the_problem():
  model = clip.CLIP(**TINY)
  params = random_params(model)
  images, tokens = inputs()
  with pytest.raises(ValueError, match=r"expected \[batch, 16, 16, 3\]"):
    model.apply({"params": params}, images[:, :8], method=clip.CLIP.encode_image)
  with pytest.raises(ValueError, match=r"context_length=8"):
    model.apply({"params": params}, np.zeros((1, 9), np.int32), method=clip.CLIP.encode_text)
  with pytest.raises(ValueError, match=r"activation='swish'"):
    clip.CLIP(**{**TINY, "activation": "swish"}).apply({"params": params}, images, tokens)
  with pytest.raises(ValueError, match=r"not divisible by heads=3"):
    clip.abstract_params(clip.CLIP(**{**TINY, "vision_heads": 3}))


def test_params_are_sharded_by_their_logical_axes():
  model = clip.CLIP(**TINY, scan_layers=True)
  mesh = sharding.create_mesh(common.mesh_config(data=2, fsdp=2, tensor=2))
  rules = common.DEFAULT_LOGICAL_AXIS_RULES
  images, tokens = inputs(batch=4)
  init_fn = lambda rng: model.init(rng, images, tokens)["params"]  # noqa: E731
  boxed = jax.eval_shape(init_fn, key(0))
  boxes = jax.tree.leaves(boxed, is_leaf=lambda b: isinstance(b, nn.LogicallyPartitioned))
  assert all(isinstance(b, nn.LogicallyPartitioned) for b in boxes)  # every param names its axes
  params, shardings = sharding.create_sharded_state(init_fn, mesh, rules, key(0))
  assert params["text"]["token_embedding"]["embedding"].sharding.spec == P("tensor", "fsdp")
  assert params["visual"]["patch_embedding"]["kernel"].sharding.spec == P(None, None, None, "fsdp")
  assert params["visual"]["transformer"]["blocks"]["attn"]["query"]["kernel"].sharding.spec == P(
      None, "fsdp", "tensor", None)
  assert params["text"]["projection"].sharding.spec == P("fsdp", None)
  assert shardings["logit_scale"].spec == P()
  run = lambda p: model.apply({"params": p}, images, tokens)  # noqa: E731
  with sharding.mesh_and_rules(mesh, rules):
    sharded = jax.jit(run)(params)
  expected = jax.jit(run)(jax.device_get(params))
  for got, want in zip(sharded, expected):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_model_config_round_trip():
  model = clip.CLIP(**{**TINY, "dtype": jnp.bfloat16}, scan_layers=True, remat=True, activation="gelu")
  config = clip.model_config(model, source="test")
  assert config["kind"] == "clip" and config["dtype"] == "bfloat16" and config["activation"] == "gelu"
  rebuilt = clip.from_model_config(config)
  assert clip.model_config(rebuilt, source="test") == config
  assert rebuilt.scan_layers and rebuilt.remat and rebuilt.text_heads == 4
  assert clip.from_model_config(config, dtype="float32", scan_layers=False).dtype == jnp.float32
  with pytest.raises(DataError, match=r"kind='dvae'"):
    clip.from_model_config({**config, "kind": "dvae"})
  with pytest.raises(DataError, match=r"unknown fields \['n_heads'\]"):
    clip.from_model_config({**config, "n_heads": 4})
  with pytest.raises(DataError, match=r"activation='relu'"):
    clip.from_model_config({**config, "activation": "relu"})


@pytest.mark.parametrize("name, parameters", [
    # OpenAI's published counts (their notebook prints them after clip.load).
    ("clip_vit_b32", 151_277_313), ("clip_vit_b16", 149_620_737),
    ("clip_vit_l14", 427_616_513), ("clip_vit_l14_336", 427_944_193),
])
def test_configs_build_openai_sized_models(name, parameters):
  config = importlib.import_module(f"mmjax.configs.{name}").get_config()
  model = clip.from_model_config(config.model)
  assert model.scan_layers and model.dtype == jnp.bfloat16
  assert config.data.image_size == model.image_size and config.data.text_length == model.context_length
  params = clip.abstract_params(model)
  assert sum(math.prod(x.shape) for x in jax.tree.leaves(params)) == parameters
  assert params["visual"]["transformer"]["blocks"]["ln_1"]["scale"].shape == (model.vision_layers,
                                                                               model.vision_width)
  assert params["text"]["transformer"]["blocks"]["mlp"]["fc"]["kernel"].shape == (
      model.text_layers, model.text_width, 4 * model.text_width)
