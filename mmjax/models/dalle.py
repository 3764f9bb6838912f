"""DALL·E's transformer (Ramesh et al., 2021) in Flax Linen: text tokens then image tokens, modelled
as one causal sequence with the paper's sparse attention patterns.

Sequence (L = T + N): positions 0 … T−1 hold the caption's text tokens in the tokenizer's "dalle"
layout (an empty position i holds the pad id text_vocab_size + i, so every position has its own
learned pad token), then the N = grid_size² dVAE codes in raster order. Position p predicts token
p + 1: text positions 0 … T−2 predict text, position T−1 predicts image token 0, and position
T+N−2 the last image token (the last position's prediction is never used).

  embeddings  text: a table of text_vocab_size + text_length rows + learned positions;
              image: a table of image_vocab_size rows + row and column embeddings
  blocks      pre-norm: x + attn(ln_1(x)); x + mlp(ln_2(x)). Layer i attends with its pattern
              (`attention.layer_patterns`: row / column / conv); the pattern id is a scanned
              input, so the mixed schedule compiles as one scanned block
  head        ln_final → one Dense over the joint vocabulary [text ids | image codes]:
              logits[..., :text_rows] score text ids (text_rows = text_vocab_size + text_length),
              logits[..., text_rows:] score image codes 0 … image_vocab_size − 1

`dalle_loss` softmaxes text predictions over the text range and image predictions over the image
range, so a sampler that keeps `logits[..., text_rows:]` samples what the model was trained on.
Training computes only those blocks (`Dalle.prediction_logits`: text positions through the head's
text columns, image positions through its image columns), the same values as slicing the joint
logits (`split_logits`) for a third of the head's work at the shapes size, where the joint head's
forward and backward took more than half of the train step.

Decoding: `Dalle.decode(tokens, index)` runs a chunk of positions index … index+C−1 against a KV
cache (the "cache" collection, one [B, L, heads, head_dim] key and value per layer): C = T with
index 0 prefills the caption, C = 1 adds one image token. `init_cache` / `decode_step` wrap it.

Parameter tree: text_embedding/embedding, image_embedding/embedding, text_positions, image_rows,
image_columns, blocks (stacked on a leading `layers` axis; `blocks_0 …` with scan_layers=False)
of ln_1, attn/{query,key,value,out}, ln_2, mlp/{fc,proj} as in `mmjax.models.layers`; ln_final, head.
"""

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.errors import DataError
from mmjax.models import attention
from mmjax.models import layers
from mmjax.models import model_config as model_config_lib

KIND = "dalle"
RESIDUAL = layers.RESIDUAL
LOGITS = ("activation_batch", "activation_length", "activation_vocab")


class JointHead(nn.Module):
  """The output head: one Dense over the joint vocabulary (params kernel [width, vocab_size] and bias,
  as nn.Dense names them). `columns=(start, stop)` computes only those logits."""
  vocab_size: int
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x, columns=None):
    # Zero-initialised: the first loss is exactly ln(text_rows)/8 + 7·ln(image_vocab_size)/8.
    kernel = self.param("kernel", layers.zeros_init(("embed", "vocab")), (x.shape[-1], self.vocab_size),
                        self.param_dtype)
    bias = self.param("bias", layers.zeros_init(("vocab",)), (self.vocab_size,), self.param_dtype)
    if columns is not None:
      kernel, bias = kernel[:, columns[0]:columns[1]], bias[columns[0]:columns[1]]
    logits = jnp.einsum("...d,dv->...v", x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)
    return nn.with_logical_constraint(logits.astype(jnp.float32), LOGITS)


@functools.lru_cache(maxsize=8)
def _masks(text_length, grid_size, kernel_size):
  return attention.mask_stack(text_length, grid_size, kernel_size)


class DalleAttention(nn.Module):
  """Multi-head self-attention under the layer's DALL·E mask; params as layers.MultiHeadAttention.

  Without `index`: the whole sequence through `attention_fn(q, k, v, pattern_id)`. With `index`:
  a chunk of positions index … index+C−1 written into the KV cache and attended against it, each
  query under its row of the pattern's mask (keys not written yet are always masked: causal).
  """
  num_heads: int
  text_length: int
  grid_size: int
  kernel_size: int
  attention_fn: Any
  out_init_std: float = 0.02
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, pattern_id, index=None):
    width = x.shape[-1]
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    query, key, value = (
        nn.with_logical_constraint(
            layers.HeadsProjection(self.num_heads, width // self.num_heads, name=name, **common)(x), layers.HEADS)
        for name in ("query", "key", "value"))
    if index is None:
      attended = self.attention_fn(query, key, value, pattern_id)
    else:
      attended = self._cached_attention(query, key, value, pattern_id, index)
    attended = nn.with_logical_constraint(attended, layers.HEADS)
    out = layers.HeadsOutput(width, self.out_init_std, name="out", **common)(attended)
    return nn.with_logical_constraint(out, RESIDUAL)

  def _cached_attention(self, query, key, value, pattern_id, index):
    batch, chunk, heads, head_dim = key.shape
    length = self.text_length + self.grid_size ** 2
    shape = (batch, length, heads, head_dim)
    cached_key = self.variable("cache", "cached_key", jnp.zeros, shape, key.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, shape, value.dtype)
    start = (0, index, 0, 0)
    cached_key.value = nn.with_logical_constraint(
        jax.lax.dynamic_update_slice(cached_key.value, key.astype(cached_key.value.dtype), start), layers.HEADS)
    cached_value.value = nn.with_logical_constraint(
        jax.lax.dynamic_update_slice(cached_value.value, value.astype(cached_value.value.dtype), start),
        layers.HEADS)
    # The chunk's rows of this layer's mask: [1, C, L], broadcast over batch and heads.
    rows = jax.lax.dynamic_slice(jnp.asarray(_masks(self.text_length, self.grid_size, self.kernel_size)),
                                 (pattern_id, index, 0), (1, chunk, length))
    return layers.dot_product_attention(query, cached_key.value, cached_value.value, mask=rows[None])


class DalleBlock(nn.Module):
  """Pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); nn.scan's (carry, output) signature."""
  num_heads: int
  mlp_dim: int
  text_length: int
  grid_size: int
  kernel_size: int
  attention_fn: Any
  activation: str = "gelu"
  out_init_std: float = 0.02
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, pattern_id, index=None):
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = DalleAttention(self.num_heads, self.text_length, self.grid_size, self.kernel_size, self.attention_fn,
                          self.out_init_std, name="attn", **common)
    x = nn.with_logical_constraint(x + attn(layers.LayerNorm(name="ln_1", **common)(x), pattern_id, index),
                                   RESIDUAL)
    mlp = layers.Mlp(self.mlp_dim, self.activation, self.out_init_std, name="mlp", **common)
    x = nn.with_logical_constraint(x + mlp(layers.LayerNorm(name="ln_2", **common)(x)), RESIDUAL)
    return x, None


class Dalle(nn.Module):
  """The text+image transformer. Defaults are the paper's 12B model.

  `__call__(text_tokens [B, T], image_tokens [B, N] or [B, g, g]) -> f32 logits [B, L, vocab_size]`
  (see the module docstring for the joint vocabulary); `prediction_logits(...)` → the blocks the
  loss reads. `decode(tokens [B, C], index)` → logits [B, C, vocab_size] for positions
  index … index+C−1 using and updating the "cache" collection.
  """
  text_vocab_size: int = 16384
  text_length: int = 256
  image_vocab_size: int = 8192
  grid_size: int = 32
  width: int = 3968
  num_layers: int = 64
  num_heads: int = 62
  mlp_dim: int = 4 * 3968
  kernel_size: int = 11               # the last layer's convolutional window (odd)
  activation: str = "gelu"
  attention_kernel: str = "dense"     # dense (XLA, any backend) | splash (TPU block-sparse)
  block_size: int = 128               # splash attention block (a multiple of 128)
  scan_layers: bool = True
  remat: bool = True
  remat_policy: str = "nothing_saveable"  # a name in jax.checkpoint_policies
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32

  @property
  def text_rows(self):
    """Text embedding rows and the image codes' offset in the joint vocabulary."""
    return self.text_vocab_size + self.text_length

  @property
  def image_length(self):
    return self.grid_size ** 2

  @property
  def sequence_length(self):
    return self.text_length + self.image_length

  @property
  def vocab_size(self):
    return self.text_rows + self.image_vocab_size

  def setup(self):
    check_fields(self)
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.text_embedding = nn.Embed(self.text_rows, self.width,
                                   embedding_init=layers.normal_init(0.02, ("vocab", "embed")), **common)
    self.image_embedding = nn.Embed(self.image_vocab_size, self.width,
                                    embedding_init=layers.normal_init(0.02, ("vocab", "embed")), **common)
    position_init = layers.normal_init(0.01, (None, "embed"))
    self.text_positions = self.param("text_positions", position_init, (self.text_length, self.width),
                                     self.param_dtype)
    self.image_rows = self.param("image_rows", position_init, (self.grid_size, self.width), self.param_dtype)
    self.image_columns = self.param("image_columns", position_init, (self.grid_size, self.width),
                                    self.param_dtype)
    fields = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, text_length=self.text_length,
                  grid_size=self.grid_size, kernel_size=self.kernel_size, activation=self.activation,
                  attention_fn=attention.make_attention_fn(self.attention_kernel, self.text_length, self.grid_size,
                                                           self.kernel_size, block_size=self.block_size),
                  out_init_std=self.width ** -0.5 * (2 * self.num_layers) ** -0.5, **common)
    block = DalleBlock
    if self.remat:
      block = nn.remat(block, prevent_cse=not self.scan_layers,
                       policy=getattr(jax.checkpoint_policies, self.remat_policy))
    if self.scan_layers:
      self.blocks = nn.scan(block, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True},
                            in_axes=(0, nn.broadcast), length=self.num_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})(**fields)
    else:
      self.blocks = [block(**fields) for _ in range(self.num_layers)]
    self.ln_final = layers.LayerNorm(**common)
    self.head = JointHead(self.vocab_size, **common)

  def embed(self, tokens, start):
    """tokens [B, C] at positions start … start+C−1 (text ids at text positions, image codes at image
    positions) → [B, C, width]. `start` may be traced; both embeddings are looked up and one kept."""
    positions = start + jnp.arange(tokens.shape[1])
    is_text = positions < self.text_length
    lookup = lambda table, index: jnp.take(table, index, axis=0).astype(self.dtype)  # noqa: E731
    text = (self.text_embedding(jnp.where(is_text, tokens, 0))
            + lookup(self.text_positions, jnp.minimum(positions, self.text_length - 1)))
    cell = jnp.clip(positions - self.text_length, 0, self.image_length - 1)
    image = (self.image_embedding(jnp.where(is_text, 0, tokens))
             + lookup(self.image_rows, cell // self.grid_size) + lookup(self.image_columns, cell % self.grid_size))
    return nn.with_logical_constraint(jnp.where(is_text[:, None], text, image).astype(self.dtype), RESIDUAL)

  def _features(self, x, index):
    pattern_ids = jnp.asarray(attention.layer_pattern_ids(self.num_layers))
    if self.scan_layers:
      x, _ = self.blocks(x, pattern_ids, index)
    else:
      for block, pattern_id in zip(self.blocks, pattern_ids):
        x, _ = block(x, pattern_id, index)
    return self.ln_final(x)

  def __call__(self, text_tokens, image_tokens):
    return self.head(self._features(self.embed(self._sequence(text_tokens, image_tokens), 0), None))

  def prediction_logits(self, text_tokens, image_tokens):
    """(text f32 [B, T−1, text_rows], image f32 [B, N, image_vocab_size]): positions 0 … T−2 over the
    text columns (they predict text tokens 1 … T−1), positions T−1 … L−2 over the image columns
    (they predict the N codes). Equal to `split_logits(__call__(...))`, computing only these."""
    x = self._features(self.embed(self._sequence(text_tokens, image_tokens), 0), None)
    text = self.head(x[:, :self.text_length - 1], columns=(0, self.text_rows))
    image = self.head(x[:, self.text_length - 1:-1], columns=(self.text_rows, self.vocab_size))
    return text, image

  def _sequence(self, text_tokens, image_tokens):
    """[B, L]: the caption then the codes, after checking both shapes."""
    batch = text_tokens.shape[0]
    if text_tokens.shape != (batch, self.text_length):
      raise ValueError(f"DALL·E: text_tokens of shape {text_tokens.shape}, expected [batch, "
                       f"text_length={self.text_length}]")
    if image_tokens.shape not in ((batch, self.image_length), (batch, self.grid_size, self.grid_size)):
      raise ValueError(f"DALL·E: image_tokens of shape {image_tokens.shape}, expected [batch, "
                       f"{self.image_length}] or [batch, {self.grid_size}, {self.grid_size}] (grid_size)")
    return jnp.concatenate([text_tokens, image_tokens.reshape(batch, -1)], axis=1)

  def decode(self, tokens, index):
    """Logits [B, C, vocab_size] for tokens [B, C] at positions index … index+C−1 (index ≥ 0, may be
    traced; index + C ≤ sequence_length), reading and writing the "cache" collection."""
    return self.head(self._features(self.embed(tokens, index), jnp.asarray(index, jnp.int32)))


def check_fields(model):
  """ValueError naming the field when the sizes cannot work together."""
  if model.width % model.num_heads:
    raise ValueError(f"DALL·E: width={model.width} is not divisible by num_heads={model.num_heads}")
  if model.text_length < 2:
    raise ValueError(f"DALL·E: text_length={model.text_length}, expected ≥ 2 (the text loss predicts "
                     "tokens 1 … T−1)")
  if model.activation not in layers.ACTIVATIONS:
    raise ValueError(f"DALL·E: activation={model.activation!r}, expected one of {layers.ACTIVATIONS}")
  if model.attention_kernel not in attention.KINDS:
    raise ValueError(f"DALL·E: attention_kernel={model.attention_kernel!r}, expected one of {attention.KINDS}")
  if not callable(getattr(jax.checkpoint_policies, model.remat_policy, None)):
    raise ValueError(f"DALL·E: remat_policy={model.remat_policy!r} is not a jax.checkpoint_policies name")


# ----------------------------------------------------------------------------- loss

def _cross_entropy(logits, targets):
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def split_logits(logits, text_length, image_vocab_size):
  """Joint logits [B, L, vocab_size] (`Dalle.__call__`) → `Dalle.prediction_logits`' (text, image)."""
  text_rows = logits.shape[-1] - image_vocab_size
  return logits[:, :text_length - 1, :text_rows], logits[:, text_length - 1:-1, text_rows:]


def image_code_nll(image_logits, image_tokens):
  """−log p of each image code given the text and the codes before it: [B, N] f32 (image_logits from
  `Dalle.prediction_logits`, image_tokens [B, N] or [B, g, g])."""
  return _cross_entropy(image_logits, image_tokens.reshape(image_tokens.shape[0], -1))


def dalle_loss(predictions, text_tokens, image_tokens, *, text_loss_weight=1 / 8):
  """The paper's loss: cross-entropy averaged per modality, text × 1/8 + image × 7/8.

  predictions: (text_logits, image_logits) from `Dalle.prediction_logits` (or `split_logits`);
  text_tokens [B, T]; image_tokens [B, N] or [B, g, g]. Text targets are tokens 1 … T−1 (pads
  included: each is its position's learned pad), scored over the text range; image targets are all
  N codes, scored over the image range. Returns (loss, {"loss", "text_loss", "image_loss"}), f32 scalars.
  """
  text_logits, image_logits = predictions
  text_loss = _cross_entropy(text_logits, text_tokens[:, 1:]).mean()
  image_loss = image_code_nll(image_logits, image_tokens).mean()
  loss = text_loss_weight * text_loss + (1 - text_loss_weight) * image_loss
  return loss, {"loss": loss, "text_loss": text_loss, "image_loss": image_loss}


# ----------------------------------------------------------------------------- decoding helpers

def unconditional_text(model, batch):
  """The all-pad caption in the "dalle" layout, int32 [batch, text_length]: position i holds its own
  pad id text_vocab_size + i. Classifier-free guidance samples against it; training with
  `caption_dropout` > 0 shows it in place of some captions so the model learns p(image) too."""
  pads = jnp.arange(model.text_vocab_size, model.text_vocab_size + model.text_length, dtype=jnp.int32)
  return jnp.broadcast_to(pads, (batch, model.text_length))


def drop_captions(text_tokens, rate, key, model):
  """text_tokens [B, T] with each row replaced by `unconditional_text` with probability `rate`."""
  dropped = jax.random.bernoulli(key, rate, (text_tokens.shape[0], 1))
  return jnp.where(dropped, unconditional_text(model, text_tokens.shape[0]), text_tokens)


def init_cache(model, batch):
  """An all-zero KV cache for `batch` sequences (no params are created: shapes come from eval_shape)."""
  tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
  shapes = jax.eval_shape(lambda t: model.init(jax.random.key(0, impl="rbg"), t, 0, method=Dalle.decode),
                          tokens)["cache"]
  return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)


def decode_step(model, params, cache, tokens, index):
  """(logits [B, C, vocab_size], new cache) for tokens [B, C] at positions index … index+C−1."""
  logits, variables = model.apply({"params": params, "cache": cache}, tokens, index, method=Dalle.decode,
                                  mutable=["cache"])
  return logits, variables["cache"]


def abstract_params(model, batch=1):
  """The model's param tree as ShapeDtypeStructs (no allocation), boxes removed. Traced with the dense
  kernel, which has the same params and, unlike splash, traces for any backend."""
  model = model.clone(attention_kernel="dense")
  text = jax.ShapeDtypeStruct((batch, model.text_length), jnp.int32)
  image = jax.ShapeDtypeStruct((batch, model.image_length), jnp.int32)
  variables = jax.eval_shape(lambda t, i: model.init(jax.random.key(0, impl="rbg"), t, i), text, image)
  return nn.unbox(variables["params"])


# ----------------------------------------------------------------------------- export config

MODEL_FIELDS = ("text_vocab_size", "text_length", "image_vocab_size", "grid_size", "width", "num_layers",
                "num_heads", "mlp_dim", "kernel_size", "activation", "attention_kernel", "block_size",
                "scan_layers", "remat", "remat_policy", "dtype", "param_dtype")
INFO_FIELDS = ("kind", "source")


def model_config(module, **info):
  """The module's fields as a JSON-able dict with `"kind": "dalle"` (plus `info`, e.g. source)."""
  return model_config_lib.to_dict(module, KIND, MODEL_FIELDS, INFO_FIELDS, info)


def from_model_config(config: Mapping[str, Any], **overrides) -> Dalle:
  """Rebuilds a Dalle from `model_config`'s dict (or a `config.model` ConfigDict); `overrides` replace
  fields (e.g. dtype="float32", or attention_kernel="dense" to sample on a CPU)."""
  model = Dalle(**model_config_lib.module_kwargs(config, overrides, KIND, MODEL_FIELDS, INFO_FIELDS))
  try:
    check_fields(model)
  except ValueError as e:
    raise DataError(f"dalle model config: {e}") from e
  return model
