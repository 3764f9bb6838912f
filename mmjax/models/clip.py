"""CLIP (Radford et al., 2021) in Flax Linen: a vision transformer and a text transformer trained to
agree, with a learned temperature. The architecture follows OpenAI's released ViT models, so their
weights (and open_clip's ViT checkpoints) convert 1:1 with `mmjax.tools.convert_openai_clip`.

  Vision: images [B, S, S, 3] (NHWC, CLIP-normalised pixels) → patch conv (no bias, stride = patch)
          → [class token; patches] + learned positions → ln_pre → transformer → ln_post on the
          class token → projection (no bias) → [B, embed_dim].
  Text:   token ids [B, L ≤ context_length] → token embedding + learned positions → causal
          transformer → ln_final at the end-of-text token (the row's argmax id: OpenAI's eot has
          the largest id, and so does mmjax's sentencepiece "clip" layout) → projection → [B, embed_dim].
  CLIP:   both towers + `logit_scale`, a learned log-temperature initialised to ln(1/0.07); the
          forward uses exp(min(logit_scale, ln max_logit_scale)), i.e. a scale of at most 100.

Parameter tree (compare OpenAI's state-dict keys in the converter's docstring):
  visual/{patch_embedding/kernel, class_embedding, positional_embedding, ln_pre, transformer, ln_post,
          projection}
  text/{token_embedding/embedding, positional_embedding, transformer, ln_final, projection}
  logit_scale
where each `transformer` holds `blocks_0 …` (or `blocks`, stacked, with scan_layers=True) of
`ln_1, attn/{query,key,value,out}, ln_2, mlp/{fc,proj}` (see `mmjax.models.layers`).

Precision: the transformers compute in `dtype` (bf16 on TPU) with f32 parameters; LayerNorms
compute in f32, and the final LayerNorms and projections run in f32 so embeddings come out in f32.
"""

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.errors import DataError
from mmjax.models import model_config as model_config_lib
from mmjax.models import layers

KIND = "clip"
RESIDUAL = layers.RESIDUAL


def _projection(module, width, embed_dim):
  # The output side stays unsharded: embed_dim ≤ 1024 and the matmul runs once per example.
  return module.param("projection", layers.normal_init(width ** -0.5, ("embed", None)), (width, embed_dim),
                      module.param_dtype)


class VisionTransformer(nn.Module):
  """images [B, image_size, image_size, 3] → f32 image features [B, embed_dim] (not normalised)."""
  image_size: int = 224
  patch_size: int = 32
  width: int = 768
  layers: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  embed_dim: int = 512
  activation: str = "quick_gelu"
  scan_layers: bool = False
  remat: bool = False
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    expected = (self.image_size, self.image_size, 3)
    if images.ndim != 4 or images.shape[1:] != expected:
      raise ValueError(f"CLIP vision: images of shape {images.shape}, expected [batch, {self.image_size}, "
                       f"{self.image_size}, 3] (NHWC at the model's image_size)")
    if self.image_size % self.patch_size:
      raise ValueError(f"CLIP vision: image_size={self.image_size} is not divisible by "
                       f"patch_size={self.patch_size}")
    batch = images.shape[0]
    grid = self.image_size // self.patch_size
    scale = self.width ** -0.5
    patches = nn.Conv(
        self.width, (self.patch_size, self.patch_size), strides=(self.patch_size, self.patch_size),
        padding="VALID", use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
        name="patch_embedding",
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, None, "embed")),
    )(images.astype(self.dtype))
    patches = patches.reshape(batch, grid * grid, self.width)  # row-major, as OpenAI flattens NCHW
    class_embedding = self.param("class_embedding", layers.normal_init(scale, ("embed",)), (self.width,),
                                 self.param_dtype)
    positions = self.param("positional_embedding", layers.normal_init(scale, (None, "embed")),
                           (grid * grid + 1, self.width), self.param_dtype)
    class_token = jnp.broadcast_to(class_embedding.astype(self.dtype), (batch, 1, self.width))
    x = jnp.concatenate([class_token, patches], axis=1) + positions.astype(self.dtype)
    x = nn.with_logical_constraint(x, RESIDUAL)
    x = layers.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="ln_pre")(x)
    class_token = layers.Transformer(self.layers, self.heads, self.mlp_dim, self.activation, self.scan_layers,
                                     self.remat, self.dtype, self.param_dtype, name="transformer")(
                                         x, output_index=jnp.zeros((batch,), jnp.int32))
    pooled = layers.LayerNorm(dtype=jnp.float32, param_dtype=self.param_dtype, name="ln_post")(class_token)
    return pooled @ _projection(self, self.width, self.embed_dim).astype(jnp.float32)


class TextTransformer(nn.Module):
  """token ids [B, L ≤ context_length] → f32 text features [B, embed_dim] (not normalised).

  Causal: position i attends to positions ≤ i, so ids after the end-of-text token never change
  the features, which are read at `tokens.argmax(-1)`.
  """
  vocab_size: int = 49408
  context_length: int = 77
  width: int = 512
  layers: int = 12
  heads: int = 8
  mlp_dim: int = 2048
  embed_dim: int = 512
  activation: str = "quick_gelu"
  scan_layers: bool = False
  remat: bool = False
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    if tokens.ndim != 2 or not 0 < tokens.shape[1] <= self.context_length:
      raise ValueError(f"CLIP text: tokens of shape {tokens.shape}, expected [batch, length] with "
                       f"1 ≤ length ≤ context_length={self.context_length}")
    length = tokens.shape[1]
    x = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                 embedding_init=layers.normal_init(0.02, ("vocab", "embed")), name="token_embedding")(tokens)
    positions = self.param("positional_embedding", layers.normal_init(0.01, (None, "embed")),
                           (self.context_length, self.width), self.param_dtype)
    x = nn.with_logical_constraint(x + positions[:length].astype(self.dtype), RESIDUAL)
    # Only the end-of-text position is read (LayerNorm is per position), so the last block computes it alone.
    end_of_text = layers.Transformer(self.layers, self.heads, self.mlp_dim, self.activation, self.scan_layers,
                                     self.remat, self.dtype, self.param_dtype, name="transformer")(
                                         x, layers.causal_mask(length), output_index=jnp.argmax(tokens, axis=-1))
    pooled = layers.LayerNorm(dtype=jnp.float32, param_dtype=self.param_dtype, name="ln_final")(end_of_text)
    return pooled @ _projection(self, self.width, self.embed_dim).astype(jnp.float32)


def l2_normalize(x, eps=1e-12):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps))


def clip_logits(image_embeddings, text_embeddings, logit_scale):
  """logits_per_image [N_images, N_texts] = logit_scale · cosine similarity (inputs unit-norm, as
  `CLIP.__call__` returns them); logits_per_text is its transpose."""
  return logit_scale * image_embeddings @ text_embeddings.T


class CLIP(nn.Module):
  """Image and text towers with a learned temperature. Defaults are OpenAI's ViT-B/32.

  `__call__(images, tokens) -> (image_embeddings, text_embeddings, logit_scale)`: f32 unit-norm
  embeddings [B_img, embed_dim] and [B_txt, embed_dim], and the scalar multiplier
  exp(min(logit_scale param, ln max_logit_scale)) ≤ max_logit_scale. `clip_logits` turns them into
  logits; `CLIP.logits` does both in one call. `encode_image` / `encode_text` return the
  projected features before normalisation (as OpenAI's `encode_image` / `encode_text`).
  """
  embed_dim: int = 512
  image_size: int = 224
  patch_size: int = 32
  vision_width: int = 768
  vision_layers: int = 12
  vision_heads: int = 12
  vision_mlp_dim: int = 3072
  context_length: int = 77
  vocab_size: int = 49408
  text_width: int = 512
  text_layers: int = 12
  text_heads: int = 8
  text_mlp_dim: int = 2048
  activation: str = "quick_gelu"      # OpenAI's models; "gelu" for open_clip's non-quickgelu ones
  logit_scale_init: float = math.log(1 / 0.07)
  max_logit_scale: float = 100.0
  scan_layers: bool = False
  remat: bool = False
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32

  def setup(self):
    layers.activation_fn(self.activation)  # a bad name fails at init, not deep inside a trace
    shared = dict(embed_dim=self.embed_dim, activation=self.activation, scan_layers=self.scan_layers,
                  remat=self.remat, dtype=self.dtype, param_dtype=self.param_dtype)
    self.visual = VisionTransformer(self.image_size, self.patch_size, self.vision_width, self.vision_layers,
                                    self.vision_heads, self.vision_mlp_dim, **shared)
    self.text = TextTransformer(self.vocab_size, self.context_length, self.text_width, self.text_layers,
                                self.text_heads, self.text_mlp_dim, **shared)
    self.logit_scale = self.param(
        "logit_scale", nn.with_logical_partitioning(nn.initializers.constant(self.logit_scale_init), ()), (),
        self.param_dtype)

  def encode_image(self, images):
    """images [B, S, S, 3] → f32 features [B, embed_dim] (projected, not normalised)."""
    return self.visual(images)

  def encode_text(self, tokens):
    """int token ids [B, L] (end-of-text = the row's largest id) → f32 features [B, embed_dim]."""
    return self.text(tokens)

  def scale(self):
    """exp(logit_scale), clipped to max_logit_scale (f32 scalar)."""
    return jnp.exp(jnp.minimum(self.logit_scale.astype(jnp.float32), math.log(self.max_logit_scale)))

  def __call__(self, images, tokens):
    return l2_normalize(self.encode_image(images)), l2_normalize(self.encode_text(tokens)), self.scale()

  def logits(self, images, tokens):
    """logits_per_image [B_img, B_txt]; transpose for logits_per_text (as OpenAI's `forward`)."""
    return clip_logits(*self(images, tokens))


def clamp_logit_scale(params, max_logit_scale=100.0):
  """params with `logit_scale` clamped to ≤ ln(max_logit_scale): what OpenAI does after each update, so
  the parameter cannot drift above the cap where the clipped forward gives it no gradient."""
  return {**params, "logit_scale": jnp.minimum(params["logit_scale"], math.log(max_logit_scale))}


# ----------------------------------------------------------------------------- export config

MODEL_FIELDS = ("embed_dim", "image_size", "patch_size", "vision_width", "vision_layers", "vision_heads",
                "vision_mlp_dim", "context_length", "vocab_size", "text_width", "text_layers", "text_heads",
                "text_mlp_dim", "activation", "logit_scale_init", "max_logit_scale", "scan_layers", "remat",
                "dtype", "param_dtype")
# Keys an exported model.json or config.model may carry besides the module fields.
INFO_FIELDS = ("kind", "source")


def model_config(module, **info):
  """The module's fields as a JSON-able dict with `"kind": "clip"` (plus `info`, e.g. source)."""
  return model_config_lib.to_dict(module, KIND, MODEL_FIELDS, INFO_FIELDS, info)


def from_model_config(config: Mapping[str, Any], **overrides) -> CLIP:
  """Rebuilds a CLIP from `model_config`'s dict (or a `config.model` ConfigDict); `overrides`
  replace fields (e.g. dtype="float32" for CPU inference, scan_layers=True together with
  `layers.stack_layers(params)`)."""
  fields = model_config_lib.module_kwargs(config, overrides, KIND, MODEL_FIELDS, INFO_FIELDS)
  if fields.get("activation", "quick_gelu") not in layers.ACTIVATIONS:
    raise DataError(f"clip model config activation={fields['activation']!r}, expected one of "
                    f"{layers.ACTIVATIONS}")
  return CLIP(**fields)


def abstract_params(model, batch=1):
  """The model's param tree as ShapeDtypeStructs (no allocation), boxes removed."""
  images = jax.ShapeDtypeStruct((batch, model.image_size, model.image_size, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((batch, model.context_length), jnp.int32)
  variables = jax.eval_shape(lambda x, t: model.init(jax.random.key(0, impl="rbg"), x, t), images, tokens)
  return nn.unbox(variables["params"])
