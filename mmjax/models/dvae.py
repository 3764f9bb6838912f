"""OpenAI's discrete VAE (DALL·E stage one) in Flax Linen, NHWC.

The encoder turns an image in the dVAE pixel map (values in (ε, 1−ε), see `map_pixels`) into
logits over a codebook on a grid 2^(group_count−1) times smaller; the decoder turns one-hot (or
gumbel-softmax relaxed) codes back into per-pixel logit-Laplace statistics. The architecture and
parameter layout follow OpenAI's released `dall_e` package exactly, so its weights convert 1:1
(`mmjax.tools.convert_openai_dvae`):

  Encoder: 7×7 conv → groups of bottleneck resblocks at widths n_hid·2^g (1, 2, 4, 8 for 4
           groups), a 2×2 max-pool after every group but the last → ReLU → 1×1 conv to
           vocab_size logits.
  Decoder: 1×1 conv vocab_size → n_init → groups at widths n_hid·(…, 8, 4, 2, 1), ×2 nearest
           upsampling after every group but the last → ReLU → 1×1 conv to 2·output_channels
           statistics: [..., :C] logit-Laplace locations μ, [..., C:] log-scales ln b.
  Resblock: x·W_id (1×1, only when widths differ) + post_gain·(ReLU→conv)×4 with hidden width
           n_out/4; kernels (3, 3, 3, 1) in the encoder and (1, 3, 3, 3) in the decoder;
           post_gain = 1 / (group_count·n_blk_per_group)².

Parameter names mirror dall_e's: `group_1_block_2/conv_3/kernel` is dall_e's
`blocks.group_1.block_2.res_path.conv_3.w` (HWIO here, OIHW there).

Precision: convolutions compute in `dtype` (bf16 on TPU) with f32 parameters; like dall_e, the
vocab-sized convolutions (encoder logits, decoder input) and the small output convolution run
in f32, so logits and likelihood statistics come out in f32.
"""

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import model_config as model_config_lib

KIND = "dvae"
LOGIT_LAPLACE_EPS = 0.1
ENCODER_KERNELS = (3, 3, 3, 1)
DECODER_KERNELS = (1, 3, 3, 3)
BATCH_ONLY = ("activation_batch", None, None, None)

# dall_e's Conv2d init: N(0, 1/fan_in) weights, zero biases.
_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")


def _conv(features, kernel_size, name, dtype, param_dtype, shard_out=True):
  """A stride-1 conv padded by (k−1)//2 on each side (dall_e's padding), with logical axes.

  `shard_out=False` replicates the output channels: the decoder's 6 statistics channels divide
  over no useful fsdp size.
  """
  out_axis = "conv_out" if shard_out else None
  pad = (kernel_size - 1) // 2
  return nn.Conv(
      features, (kernel_size, kernel_size), padding=((pad, pad), (pad, pad)), dtype=dtype,
      param_dtype=param_dtype, name=name,
      kernel_init=nn.with_logical_partitioning(_kernel_init, (None, None, "conv_in", out_axis)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (out_axis,)))


class ResBlock(nn.Module):
  """Bottleneck residual block; `kernel_sizes` are the four res-path kernels."""
  n_out: int
  post_gain: float
  kernel_sizes: tuple[int, ...] = ENCODER_KERNELS
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    n_hid = self.n_out // 4
    if x.shape[-1] == self.n_out:
      identity = x
    else:
      identity = _conv(self.n_out, 1, "id_path", self.dtype, self.param_dtype)(x)
    h = x
    widths = (n_hid, n_hid, n_hid, self.n_out)
    for i, (width, kernel_size) in enumerate(zip(widths, self.kernel_sizes)):
      h = _conv(width, kernel_size, f"conv_{i + 1}", self.dtype, self.param_dtype)(nn.relu(h))
    return identity + self.post_gain * h


def _block_class(remat):
  return nn.remat(ResBlock) if remat else ResBlock


def _check_widths(n_hid, field="n_hid"):
  if n_hid % 4:
    raise ValueError(f"dVAE {field}={n_hid}: must be divisible by 4 (resblocks use n_out/4 hidden channels)")


class Encoder(nn.Module):
  """images [B, H, W, input_channels] (pixel-mapped) → f32 logits [B, H/2^(G−1), W/2^(G−1), vocab_size]."""
  n_hid: int = 256
  n_blk_per_group: int = 2
  group_count: int = 4
  vocab_size: int = 8192
  input_channels: int = 3
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, images):
    _check_widths(self.n_hid)
    factor = 2 ** (self.group_count - 1)
    if images.ndim != 4 or images.shape[-1] != self.input_channels:
      raise ValueError(f"dVAE encoder: images of shape {images.shape}, expected "
                       f"[batch, height, width, {self.input_channels}] (NHWC)")
    if images.shape[1] % factor or images.shape[2] % factor:
      raise ValueError(f"dVAE encoder: image size {images.shape[1]}×{images.shape[2]} is not divisible by "
                       f"{factor} (2^(group_count−1), group_count={self.group_count})")
    post_gain = 1.0 / (self.group_count * self.n_blk_per_group) ** 2
    block = _block_class(self.remat)
    x = nn.with_logical_constraint(images.astype(self.dtype), BATCH_ONLY)
    x = _conv(self.n_hid, 7, "input", self.dtype, self.param_dtype)(x)
    for g in range(self.group_count):
      for b in range(self.n_blk_per_group):
        x = block(self.n_hid * 2 ** g, post_gain, ENCODER_KERNELS, self.dtype, self.param_dtype,
                  name=f"group_{g + 1}_block_{b + 1}")(x)
        x = nn.with_logical_constraint(x, BATCH_ONLY)
      if g < self.group_count - 1:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    logits = _conv(self.vocab_size, 1, "output", jnp.float32, self.param_dtype)(nn.relu(x))
    return nn.with_logical_constraint(logits, BATCH_ONLY)


def upsample_nearest(x, factor=2):
  """[B, h, w, C] → [B, factor·h, factor·w, C], each pixel repeated (torch's mode='nearest')."""
  batch, height, width, channels = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (batch, height, factor, width, factor, channels))
  return x.reshape(batch, height * factor, width * factor, channels)


class Decoder(nn.Module):
  """codes [B, h, w, vocab_size] (one-hot or soft) → f32 stats [B, h·2^(G−1), w·2^(G−1), 2·out_channels]."""
  n_hid: int = 256
  n_blk_per_group: int = 2
  group_count: int = 4
  vocab_size: int = 8192
  n_init: int = 128
  output_channels: int = 3
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, codes):
    _check_widths(self.n_hid)
    if codes.ndim != 4 or codes.shape[-1] != self.vocab_size:
      raise ValueError(f"dVAE decoder: codes of shape {codes.shape}, expected "
                       f"[batch, height, width, {self.vocab_size}] (one-hot or soft codes)")
    post_gain = 1.0 / (self.group_count * self.n_blk_per_group) ** 2
    block = _block_class(self.remat)
    x = nn.with_logical_constraint(codes.astype(jnp.float32), BATCH_ONLY)
    x = _conv(self.n_init, 1, "input", jnp.float32, self.param_dtype)(x).astype(self.dtype)
    for g in range(self.group_count):
      for b in range(self.n_blk_per_group):
        x = block(self.n_hid * 2 ** (self.group_count - 1 - g), post_gain, DECODER_KERNELS, self.dtype,
                  self.param_dtype, name=f"group_{g + 1}_block_{b + 1}")(x)
        x = nn.with_logical_constraint(x, BATCH_ONLY)
      if g < self.group_count - 1:
        x = upsample_nearest(x)
    stats = _conv(2 * self.output_channels, 1, "output", jnp.float32, self.param_dtype,
                  shard_out=False)(nn.relu(x))
    return nn.with_logical_constraint(stats, BATCH_ONLY)


def gumbel_softmax(logits, temperature, rng):
  """Relaxed one-hot sample: softmax((logits + Gumbel noise) / temperature) over the last axis (f32)."""
  logits = logits.astype(jnp.float32)
  noise = jax.random.gumbel(rng, logits.shape, jnp.float32)
  return jax.nn.softmax((logits + noise) / temperature, axis=-1)


class DVAE(nn.Module):
  """Encoder + decoder; params are {"encoder": ..., "decoder": ...}.

  `__call__(images, *, temperature, rng, deterministic=False) -> (logits, stats)`: encoder logits
  [B, h, w, vocab] and decoder stats [B, H, W, 2·output_channels], both f32. Training decodes a
  gumbel-softmax sample at `temperature` (noise from `rng`); `deterministic=True` decodes the
  argmax one-hot codes (no noise; `rng` may be None).
  """
  n_hid: int = 256
  n_blk_per_group: int = 2
  group_count: int = 4
  vocab_size: int = 8192
  n_init: int = 128
  input_channels: int = 3
  output_channels: int = 3
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32
  remat: bool = False

  def setup(self):
    shared = dict(n_hid=self.n_hid, n_blk_per_group=self.n_blk_per_group, group_count=self.group_count,
                  vocab_size=self.vocab_size, dtype=self.dtype, param_dtype=self.param_dtype,
                  remat=self.remat)
    self.encoder = Encoder(input_channels=self.input_channels, **shared)
    self.decoder = Decoder(n_init=self.n_init, output_channels=self.output_channels, **shared)

  def encode(self, images):
    """images [B, H, W, C] in the dVAE pixel map → logits [B, h, w, vocab_size]."""
    return self.encoder(images)

  def decode(self, codes):
    """codes [B, h, w, vocab_size] → logit-Laplace stats [B, H, W, 2·output_channels]."""
    return self.decoder(codes)

  def encode_tokens(self, images):
    """images → argmax codebook indices [B, h, w] int32 (what the transformer is trained on)."""
    return jnp.argmax(self.encode(images), axis=-1).astype(jnp.int32)

  def decode_tokens(self, tokens):
    """codebook indices [B, h, w] → stats; `reconstruct_pixels(stats)` gives images."""
    return self.decode(jax.nn.one_hot(tokens, self.vocab_size, dtype=jnp.float32))

  def __call__(self, images, *, temperature, rng, deterministic=False):
    logits = self.encode(images)
    if deterministic:
      codes = jax.nn.one_hot(jnp.argmax(logits, axis=-1), self.vocab_size, dtype=jnp.float32)
    else:
      codes = gumbel_softmax(logits, temperature, rng)
    return logits, self.decode(codes)


# ----------------------------------------------------------------------------- math

def map_pixels(x):
  """[0, 1] → (ε, 1−ε), ε = 0.1 (dall_e's `map_pixels`)."""
  return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x):
  """(ε, 1−ε) → [0, 1], clipped (dall_e's `unmap_pixels`)."""
  return jnp.clip((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS), 0, 1)


def split_stats(stats):
  """stats [..., 2C] → (location μ [..., C], log-scale ln b [..., C])."""
  channels = stats.shape[-1] // 2
  return stats[..., :channels], stats[..., channels:]


def logit_laplace_nll(stats, target_pixels_mapped):
  """Negative log-likelihood (nats) of pixel-mapped targets under the logit-Laplace, summed per image.

  For x ∈ (ε, 1−ε), location μ and scale b = exp(log_scale) (DALL·E paper, eq. 2):
      p(x | μ, b) = 1 / (2b·x(1−x)) · exp(−|logit(x) − μ| / b)
      −ln p = ln 2 + ln b + ln x + ln(1−x) + |logit(x) − μ| / b
  i.e. a Laplace density on logit(x) times the Jacobian 1/(x(1−x)). stats [B, H, W, 2C],
  targets [B, H, W, C] → [B] (sum over H, W, C), computed in f32.
  """
  location, log_scale = split_stats(stats.astype(jnp.float32))
  x = target_pixels_mapped.astype(jnp.float32)
  if x.shape != location.shape:
    raise ValueError(f"logit_laplace_nll: targets of shape {x.shape} do not match stats of shape "
                     f"{stats.shape} (expected targets [..., {location.shape[-1]}])")
  log_x, log_1mx = jnp.log(x), jnp.log1p(-x)
  nll = (jnp.log(2.0) + log_scale + log_x + log_1mx
         + jnp.abs(log_x - log_1mx - location) * jnp.exp(-log_scale))
  return nll.reshape(nll.shape[0], -1).sum(axis=-1)


def gaussian_nll(stats, target_pixels_mapped, scale):
  """Negative log-likelihood (nats) of pixel-mapped targets under a Gaussian of mean sigmoid(μ)
  (the pixel `reconstruct_pixels` shows) and fixed standard deviation `scale`, summed per image:
      −ln p = (x − sigmoid(μ))² / (2·scale²) + ln(scale·√(2π))
  stats [B, H, W, 2C] (the log-scale channels are unused), targets [B, H, W, C] → [B], in f32.
  """
  location, _ = split_stats(stats.astype(jnp.float32))
  x = target_pixels_mapped.astype(jnp.float32)
  if x.shape != location.shape:
    raise ValueError(f"gaussian_nll: targets of shape {x.shape} do not match stats of shape "
                     f"{stats.shape} (expected targets [..., {location.shape[-1]}])")
  nll = (x - jax.nn.sigmoid(location)) ** 2 / (2 * scale ** 2) + jnp.log(scale * jnp.sqrt(2 * jnp.pi))
  return nll.reshape(nll.shape[0], -1).sum(axis=-1)


def kl_to_uniform(logits):
  """KL(softmax(logits) ‖ uniform over vocab) per position, summed over positions: [B, h, w, V] → [B].

  KL = Σ_k q_k ln q_k + ln V per position; 0 for uniform logits, ln V for a one-hot posterior.
  """
  log_q = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  per_position = jnp.sum(jnp.exp(log_q) * log_q, axis=-1) + jnp.log(logits.shape[-1])
  return per_position.reshape(per_position.shape[0], -1).sum(axis=-1)


def usage_kl_to_uniform(logits):
  """KL(mean posterior ‖ uniform): the codebook's average use over every position of the batch
  against uniform use, a scalar in [0, ln V]. Unlike `kl_to_uniform` it is 0 for confident codes
  spread evenly over the codebook, so it penalises a collapse onto a few codes, not confidence."""
  vocab = logits.shape[-1]
  mean_q = jnp.mean(jax.nn.softmax(logits.reshape(-1, vocab).astype(jnp.float32), axis=-1), axis=0)
  return jnp.sum(mean_q * jnp.log(jnp.maximum(mean_q, 1e-30))) + jnp.log(vocab)


def reconstruct_pixels(stats):
  """stats → images in [0, 1]: sigmoid of the location, then `unmap_pixels` (as OpenAI's notebook)."""
  location, _ = split_stats(stats.astype(jnp.float32))
  return unmap_pixels(jax.nn.sigmoid(location))


def codebook_perplexity(logits, hard=False):
  """exp(entropy) of the codebook usage over every position in the batch: 1 … vocab_size.

  Soft: usage = mean softmax. Hard: usage = histogram of argmax codes.
  """
  vocab = logits.shape[-1]
  flat = logits.reshape(-1, vocab).astype(jnp.float32)
  if hard:
    usage = jnp.bincount(jnp.argmax(flat, axis=-1), length=vocab) / flat.shape[0]
  else:
    usage = jax.nn.softmax(flat, axis=-1).mean(axis=0)
  entropy = -jnp.sum(jnp.where(usage > 0, usage * jnp.log(jnp.where(usage > 0, usage, 1.0)), 0.0))
  return jnp.exp(entropy)


def codebook_usage(logits):
  """Fraction of the codebook that is the argmax at some position in the batch."""
  vocab = logits.shape[-1]
  counts = jnp.bincount(jnp.argmax(logits.reshape(-1, vocab), axis=-1), length=vocab)
  return jnp.mean(counts > 0)


# ----------------------------------------------------------------------------- export config

MODEL_FIELDS = ("n_hid", "n_blk_per_group", "group_count", "vocab_size", "n_init", "input_channels",
                "output_channels", "dtype", "param_dtype", "remat")
# Keys an exported model.json or config.model may carry besides the module fields; image_size is
# the square size the dVAE was trained at (the convolutions accept any multiple of 2^(G−1)).
INFO_FIELDS = ("kind", "parts", "source", "image_size")


def model_config(module, **info):
  """The module's fields as a JSON-able dict with `"kind": "dvae"` (plus `info`, e.g. parts, source,
  image_size)."""
  return model_config_lib.to_dict(module, KIND, MODEL_FIELDS, INFO_FIELDS, info)


def from_model_config(config: Mapping[str, Any], **overrides) -> DVAE:
  """Rebuilds a DVAE from `model_config`'s dict (or a `config.model` ConfigDict); `overrides`
  replace fields (e.g. dtype="float32" for CPU inference)."""
  return DVAE(**model_config_lib.module_kwargs(config, overrides, KIND, MODEL_FIELDS, INFO_FIELDS))
