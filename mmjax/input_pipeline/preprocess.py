"""Image preprocessing as tf ops for `tf.data.Dataset.map`, and a counter for dropped examples.

Decoding: any JPEG / PNG / GIF / BMP / WebP bytes -> uint8 RGB [H, W, 3]. Grey images are
replicated to three channels; an alpha channel is dropped (colour values kept as stored, the same
as PIL's `convert("RGB")` that img2dataset uses); an animated GIF gives its first frame.
`try_decode_image` never raises: bad bytes come back with `ok = False`, and
`SkipCounter.drop_unless` removes them while counting them by reason: skipped, never silently.

Pixel maps (`config.data.pixel_map`), from uint8 [0, 255] to float32:
  dvae: x/255·(1−2ε)+ε with ε = 0.1, into (ε, 1−ε), as OpenAI's dall_e `map_pixels`;
  clip: (x/255 − mean) / std with OpenAI CLIP's per-channel mean and std;
  unit: x/255.
`unmap_pixels` inverts them back to uint8 for writing PNGs.
"""

import re

from absl import logging
import numpy as np
import tensorflow as tf

from mmjax.errors import ConfigError

DVAE_EPSILON = 0.1
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIXEL_MAPS = ("dvae", "clip", "unit")


# ----------------------------------------------------------------------------- decoding

def decode_image(image_bytes: tf.Tensor) -> tf.Tensor:
  """Encoded bytes -> uint8 [H, W, 3]; raises InvalidArgumentError on bytes it cannot decode."""
  # TF's default JPEG IDCT is the fast, less exact one; the accurate one matches PIL bit for bit,
  # so images look the same here as in PyTorch/PIL pipelines (e.g. CLIP's own preprocessing).
  return tf.cond(
      tf.io.is_jpeg(image_bytes),
      lambda: tf.io.decode_jpeg(image_bytes, channels=3, dct_method="INTEGER_ACCURATE"),
      lambda: tf.io.decode_image(image_bytes, channels=3, expand_animations=False))


def try_decode_image(image_bytes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Like `decode_image` but never raises: returns (image, ok); a failure gives ok=False, 1×1 black.

  TF ops cannot catch errors, but tf.data can: the bytes go through a one-element dataset whose
  decode error `ignore_errors` swallows, followed by the fallback, and the first element wins.
  """
  decoded = tf.data.Dataset.from_tensors(image_bytes).map(
      lambda contents: (decode_image(contents), tf.constant(True))).ignore_errors()
  fallback = tf.data.Dataset.from_tensors((tf.zeros([1, 1, 3], tf.uint8), tf.constant(False)))
  image, ok = decoded.concatenate(fallback).take(1).get_single_element()
  image.set_shape([None, None, 3])
  return image, ok


# ----------------------------------------------------------------------------- resize and crop

def resize_and_crop(image: tf.Tensor, size: int, random_crop: bool = False,
                    seed: tf.Tensor | None = None) -> tf.Tensor:
  """uint8 [H, W, C] -> uint8 [size, size, C]: the shorter side becomes `size`, then a square crop.

  The crop is centred, or with `random_crop` placed at random along the longer side by stateless
  ops keyed on `seed` (shape [2] ints; see `element_seed`), so the same seed gives the same crop.
  Cropping the square first and resizing it after gives the same picture at a fraction of the cost;
  a square that already has `size` pixels a side is returned as it is, without a resize.
  """
  height, width, channels = tf.unstack(tf.shape(image))
  side = tf.minimum(height, width)
  if random_crop:
    if seed is None:
      raise ValueError("resize_and_crop(random_crop=True) needs a seed of shape [2].")
    square = tf.image.stateless_random_crop(image, tf.stack([side, side, channels]), seed=seed)
  else:
    top, left = (height - side) // 2, (width - side) // 2
    square = image[top:top + side, left:left + side]

  def resize():
    resized = tf.image.resize(square, [size, size], method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)

  output = tf.cond(tf.equal(side, size), lambda: tf.cast(square, tf.uint8), resize)
  output.set_shape([size, size, image.shape[-1]])
  return output


def element_seed(seed: int, *indices) -> tf.Tensor:
  """A [2] int64 seed for stateless ops, distinct per (seed, indices), e.g. (process, example)."""
  element = tf.constant([seed, 0], tf.int64)
  for index in indices:
    element = tf.random.experimental.stateless_fold_in(element, tf.cast(index, tf.int64))
  return element


def random_shift(image: tf.Tensor, max_shift: int, seed: tf.Tensor) -> tf.Tensor:
  """Translates [H, W, C] by up to `max_shift` pixels along each axis, filling with zeros (black),
  at an offset drawn by stateless ops keyed on `seed` (shape [2]); the size is unchanged."""
  if max_shift <= 0:
    return image
  padded = tf.pad(image, [[max_shift, max_shift], [max_shift, max_shift], [0, 0]])
  return tf.image.stateless_random_crop(padded, tf.shape(image), seed=seed)


def maybe_grayscale(images: tf.Tensor, captions: tf.Tensor, probability: float, words: tuple[str, ...],
                    seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """With `probability` per caption (stateless draws keyed on `seed`), shows its uint8 image in grey
  (the mean of its channels) and deletes `words` (e.g. colour names) from the caption, so the
  caption stays true of the image. Seeing shapes without colour keeps a model from tying a shape
  to the colours it was trained in.

  images [..., H, W, 3] with captions [...] of the leading shape: one example or a whole batch
  (the pipeline calls it once per batch: per-example calls cost ~0.1 ms each in op overhead).
  """
  if probability <= 0:
    return images, captions
  grey = tf.cast(tf.reduce_mean(tf.cast(images, tf.float32), axis=-1, keepdims=True) + 0.5, images.dtype)
  grey_captions = captions
  if words:
    grey_captions = tf.strings.regex_replace(captions, r"\b(" + "|".join(map(re.escape, words)) + r")\b\s*", "")
  use_grey = tf.random.stateless_uniform(tf.shape(captions), seed) < probability
  image_use_grey = tf.reshape(use_grey, tf.concat([tf.shape(captions), [1, 1, 1]], axis=0))
  return (tf.where(image_use_grey, tf.broadcast_to(grey, tf.shape(images)), images),
          tf.where(use_grey, grey_captions, captions))


# ----------------------------------------------------------------------------- pixel maps

def check_pixel_map(pixel_map: str) -> None:
  if pixel_map not in PIXEL_MAPS:
    raise ConfigError(
        f"config.data.pixel_map = {pixel_map!r}; expected one of {', '.join(PIXEL_MAPS)}.")


def map_pixels(image_uint8: tf.Tensor, pixel_map: str) -> tf.Tensor:
  """uint8 image -> float32 in the model's input range (see the module docstring)."""
  check_pixel_map(pixel_map)
  unit = tf.cast(image_uint8, tf.float32) / 255.0
  if pixel_map == "dvae":
    return unit * (1.0 - 2.0 * DVAE_EPSILON) + DVAE_EPSILON
  if pixel_map == "clip":
    return (unit - tf.constant(CLIP_MEAN)) / tf.constant(CLIP_STD)
  return unit


def unmap_pixels(pixels, pixel_map: str):
  """Inverse of `map_pixels` -> uint8, rounded and clipped; numpy in, numpy out; tf in, tf out."""
  check_pixel_map(pixel_map)
  is_tf = tf.is_tensor(pixels)
  xp_pixels = tf.cast(pixels, tf.float32) if is_tf else np.asarray(pixels, np.float32)
  if pixel_map == "dvae":
    unit = (xp_pixels - DVAE_EPSILON) / (1.0 - 2.0 * DVAE_EPSILON)
  elif pixel_map == "clip":
    unit = xp_pixels * np.asarray(CLIP_STD, np.float32) + np.asarray(CLIP_MEAN, np.float32)
  else:
    unit = xp_pixels
  if is_tf:
    return tf.cast(tf.clip_by_value(tf.round(unit * 255.0), 0.0, 255.0), tf.uint8)
  return np.clip(np.round(unit * 255.0), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- skip counting

class SkipCounter:
  """Counts, per reason, the examples an input pipeline drops; read with `counts()` / `log()`.

  Read-time drops go through `drop_unless`, a `Dataset.filter` whose predicate also adds to a
  tf.Variable per reason; the filter runs once per element, so counts are exact whatever
  `num_parallel_calls` the maps around it use, and a repeated dataset counts again on each pass.
  Build-time drops (e.g. a listed file that does not exist) are added eagerly with `add`.
  Counts are per host: each process counts what it reads.
  """

  def __init__(self, name: str = "input"):
    self.name = name
    self._variables: dict[str, tf.Variable] = {}

  def _variable(self, reason: str) -> tf.Variable:
    if reason not in self._variables:
      with tf.init_scope():  # created eagerly, once, even if first asked for inside a trace
        self._variables[reason] = tf.Variable(0, dtype=tf.int64, trainable=False)
    return self._variables[reason]

  def drop_unless(self, dataset: tf.data.Dataset, keep_fn, reason: str) -> tf.data.Dataset:
    """`dataset.filter(keep_fn)`, counting each dropped element under `reason`."""
    variable = self._variable(reason)

    def keep_and_count(*element):
      keep = tf.convert_to_tensor(keep_fn(*element), tf.bool)
      counted = variable.assign_add(tf.cast(tf.logical_not(keep), tf.int64))
      with tf.control_dependencies([counted]):
        return tf.identity(keep)

    return dataset.filter(keep_and_count)

  def add(self, reason: str, count: int = 1) -> None:
    self._variable(reason).assign_add(count)

  def counts(self) -> dict[str, int]:
    return {reason: int(variable.numpy()) for reason, variable in self._variables.items()}

  def total(self) -> int:
    return sum(self.counts().values())

  def log(self) -> None:
    counts = self.counts()
    summary = ", ".join(f"{reason}: {count}" for reason, count in sorted(counts.items()))
    if self.total():
      logging.warning("%s: skipped %d examples (%s)", self.name, self.total(), summary)
    else:
      logging.info("%s: skipped no examples (%s)", self.name, summary or "no checks")
