"""Per-host batches of (text tokens, image tokens) for the DALL·E transformer.

Two sources, one batch format {"text_tokens": int32 [b, T], "image_tokens": int32 [b, N],
"caption": tf.string [b]} with b = global_batch / process_count:

  create_token_dataset   the dvae_encode job's token files (token_files.py), shuffled and
                         repeated for training, one pass in file order for eval
  synthetic_token_dataset  generated tokens whose image part is a fixed function of the text, so
                         a model can learn it: smoke tests and throughput runs without a dVAE

Both carry `settings` and work with pipeline.DataIterator, so iterator positions are saved in
train checkpoints like the image pipeline's.
"""

import numpy as np
import tensorflow as tf
from absl import logging

from mmjax.errors import ConfigError
from mmjax.input_pipeline import pipeline, token_files


def _process(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  return process_index, process_count


def local_batch_size(global_batch, process_count):
  if global_batch <= 0 or global_batch % process_count:
    raise ConfigError(f"config.data.global_batch={global_batch} must be a positive multiple of the "
                      f"process count {process_count}")
  return global_batch // process_count


def check_metadata(metadata, path, text_length, grid_size, image_vocab_size, text_vocab_size=None):
  """Raises ConfigError when the token files do not fit the model the config describes."""
  expected = {"text_length": text_length, "grid_height": grid_size, "grid_width": grid_size,
              "image_vocab_size": image_vocab_size}
  if text_vocab_size is not None:
    expected["text_vocab_size"] = text_vocab_size
  wrong = {k: (metadata.get(k), v) for k, v in expected.items() if metadata.get(k) != v}
  if wrong:
    details = ", ".join(f"{k}: files {got}, model {want}" for k, (got, want) in wrong.items())
    raise ConfigError(f"token files {path} do not fit config.model ({details}); encode with a "
                      "matching dVAE/tokenizer or change the model config")
  if metadata.get("text_layout", "dalle") != "dalle":
    raise ConfigError(f"token files {path} hold text_layout={metadata.get('text_layout')!r}; the "
                      "DALL·E transformer needs the 'dalle' layout (per-position padding)")


def _finish(dataset, local_batch, train, settings):
  dataset = dataset.batch(local_batch, drop_remainder=True).prefetch(pipeline.PREFETCH_BATCHES)
  options = tf.data.Options()
  options.deterministic = True
  dataset = dataset.with_options(options)
  dataset.settings = {**settings, "local_batch": local_batch, "train": train}
  return dataset


def create_token_dataset(path, split, global_batch, *, train, seed=0, shuffle_buffer=10_000,
                         process_index=None, process_count=None):
  """This process's batches of an encoded split: shuffled and repeated when `train`."""
  process_index, process_count = _process(process_index, process_count)
  local_batch = local_batch_size(global_batch, process_count)
  dataset = token_files.token_dataset(path, split, process_index, process_count)
  host_seed = int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])
  if train:
    dataset = dataset.shuffle(shuffle_buffer, seed=host_seed, reshuffle_each_iteration=True).repeat()
  else:
    examples = int(dataset.cardinality())
    if examples > 0 and examples % local_batch:
      logging.warning("Eval on %s/%s: the last %d of this process's %d examples do not fill a batch "
                      "of %d and are dropped", path, split, examples % local_batch, examples, local_batch)
  settings = {"source": "token_files", "path": str(path), "split": split, "seed": seed,
              "shuffle_buffer": shuffle_buffer, "process_index": process_index,
              "process_count": process_count}
  return _finish(dataset, local_batch, train, settings)


def synthetic_targets(text_tokens, num_image_tokens, image_vocab_size):
  """The synthetic set's image tokens: image token i = (7·text[i mod T] + i) mod vocab."""
  text_tokens = tf.convert_to_tensor(text_tokens)
  length = int(text_tokens.shape[-1])
  positions = tf.range(num_image_tokens)
  source = tf.gather(text_tokens, positions % length, axis=-1)
  return (7 * source + positions) % image_vocab_size


def synthetic_token_dataset(global_batch, text_length, text_vocab_size, num_image_tokens,
                            image_vocab_size, *, seed=0, num_words=4, process_index=None,
                            process_count=None, train=True):
  """Endless batches of random captions of `num_words` ids then per-position padding, and
  image tokens from `synthetic_targets`: learnable, so a loss that falls is a real signal."""
  if not 0 < num_words <= text_length:
    raise ConfigError(f"synthetic tokens: num_words={num_words} must be in 1..text_length={text_length}")
  process_index, process_count = _process(process_index, process_count)
  local_batch = local_batch_size(global_batch, process_count)
  host_seed = int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])
  positions = tf.range(text_length)
  padding = text_vocab_size + positions  # the tokenizer's "dalle" layout: pad id = vocab + position

  def example(index):
    seed_pair = tf.stack([tf.constant(host_seed % 2**31, tf.int64), index])
    words = tf.random.stateless_uniform([text_length], seed=seed_pair, maxval=text_vocab_size,
                                        dtype=tf.int32)
    text = tf.where(positions < num_words, words, padding)
    image = synthetic_targets(text, num_image_tokens, image_vocab_size)
    return {"text_tokens": text, "image_tokens": tf.cast(image, tf.int32),
            "caption": tf.strings.as_string(index)}

  dataset = tf.data.Dataset.counter().map(example)
  settings = {"source": "synthetic", "seed": seed, "text_length": text_length,
              "text_vocab_size": text_vocab_size, "num_image_tokens": num_image_tokens,
              "image_vocab_size": image_vocab_size, "num_words": num_words,
              "process_index": process_index, "process_count": process_count}
  return _finish(dataset, local_batch, train, settings)

