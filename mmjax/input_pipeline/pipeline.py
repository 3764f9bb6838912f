"""The per-host tf.data pipeline and its checkpointable iterator.

Each process reads its own part of the data (datasets.source_dataset) and yields batches of
`config.data.global_batch / process_count` examples:
  {"image": float32 [b, S, S, 3] (config.data.pixel_map), "text_tokens": int32 [b, L]
   (tokenizer layout config.data.text_layout, default "dalle"), "caption": tf.string [b]}.

Order of operations, and why:
  source (TFDS / TFRecord files shuffled by seed; images still encoded) -> shuffle + repeat
  (train) -> decode, resize/crop (random ones keyed on the example's position) -> drop undecodable
  images (counted) -> batch -> per batch: grey images (config.data.grayscale_prob), map pixels to
  float32 and tokenize (one sentencepiece call) -> prefetch.
Shuffling before decoding keeps the shuffle buffer, the bulk of an iterator checkpoint, small: it
holds PNG/JPEG bytes (a 256 px JPEG is ~20 KB, decoded 192 KB). Users' folder/TFRecord bytes may
not decode; those are dropped and counted as "undecodable_image" in the skip counter (TFDS wrote
its own bytes, so they are decoded without that check). Pixels become float32 only once
batched, so in-flight elements stay uint8. A random crop's seed is (config.seed,
process, the example's position in this host's stream): it does not depend on thread timing, and a
restored iterator crops exactly as the uninterrupted one would.

DataIterator.save / restore write this process's exact position with tf.train.Checkpoint under
`<directory>/process_<i>/`: reader positions, the shuffle buffer and random state, and the batches
already prepared (up to PREFETCH_BATCHES plus those in flight). bench/input_pipeline.py reports the
size; tf.data's symbolic checkpointing, which would skip prepared batches, hangs on the skip
counters' stateful ops, so it is not used.
"""

import json
import os

import numpy as np
import tensorflow as tf
from absl import logging

from mmjax.errors import ConfigError, DataError
from mmjax.input_pipeline import datasets, preprocess

# Batches kept ready; each one is also written into every iterator checkpoint.
PREFETCH_BATCHES = 2


def create_dataset(config, data_dir, tokenizer, *, train, process_index=None, process_count=None,
                   split=None):
  """This process's batches, shuffled and repeated forever when `train`, else one pass in file order.

  tokenizer: a tokenizer.Tokenizer, or None to leave out "text_tokens" (e.g. for dVAE training).
  split: defaults to config.data.split. An eval pass drops the last partial batch (logged).
  """
  data = config.data
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  if data.global_batch <= 0 or data.global_batch % process_count:
    raise ConfigError(f"config.data.global_batch={data.global_batch} must be a positive multiple of "
                      f"the process count {process_count}")
  local_batch = data.global_batch // process_count
  preprocess.check_pixel_map(data.pixel_map)
  text_layout = data.get("text_layout", "dalle")
  split = split or data.split
  # One integer per (config.seed, process): hosts shuffle differently, reruns identically.
  host_seed = int(np.random.SeedSequence([config.seed, process_index]).generate_state(1)[0])
  counter = preprocess.SkipCounter(f"{data.name}/{split} process {process_index}")

  # Sources hand over their PNG/JPEG bytes: the shuffle buffer, the bulk of an iterator checkpoint,
  # then holds ~200 bytes per 64 px shapes image instead of 12 KB.
  dataset = datasets.source_dataset(data, data_dir, split, process_index, process_count, counter,
                                    seed=host_seed if train else None, decode_images=False)
  if train:
    dataset = dataset.shuffle(data.shuffle_buffer, seed=host_seed, reshuffle_each_iteration=True).repeat()
  else:
    _log_eval_remainder(dataset, local_batch, data.name, split)
  random_crop = bool(data.random_crop) and train
  max_shift = int(data.get("random_shift", 0)) if train else 0
  grayscale_prob = float(data.get("grayscale_prob", 0.0)) if train else 0.0
  grayscale_words = tuple(word for word in data.get("grayscale_words", "").split(",") if word)
  # Users' files may not decode; a failed decode costs a count, not the run. (The check costs
  # ~0.3 ms per image, which TFDS's own bytes, always decodable, are spared.)
  check_decode = data.name not in datasets.TFDS_NAMES

  needs_seed = random_crop or max_shift

  def crop_example(position, example):
    seed = preprocess.element_seed(config.seed, process_index, position) if needs_seed else None
    image, decoded = example["image"], None
    if image.dtype == tf.string:
      if check_decode:
        image, decoded = preprocess.try_decode_image(image)
      else:
        image = preprocess.decode_image(image)
    image = preprocess.resize_and_crop(image, data.image_size, random_crop, seed)
    if max_shift:
      image = preprocess.random_shift(image, max_shift, tf.random.experimental.stateless_fold_in(seed, 1))
    cropped = {"image": image, "caption": example["caption"]}
    return cropped if decoded is None else (cropped, decoded)

  def finish_batch(batch_index, batch):
    # Per batch, not per example: the grey draws are keyed on (seed, process, batch index); the
    # trailing -1 keeps these seeds apart from the per-example crop seeds (seed, process, position).
    images, captions = preprocess.maybe_grayscale(
        batch["image"], batch["caption"], grayscale_prob, grayscale_words,
        preprocess.element_seed(config.seed, process_index, batch_index, -1))
    batch = {"caption": captions, "image": preprocess.map_pixels(images, data.pixel_map)}
    if tokenizer is not None:
      batch["text_tokens"] = tokenizer.tf_tokenize(batch["caption"], text_layout, data.text_length)
    return batch

  # Each per-example op costs ~10 us of tf.data overhead: only what an example needs runs here.
  if needs_seed:
    dataset = dataset.enumerate().map(crop_example, num_parallel_calls=tf.data.AUTOTUNE)
  else:
    dataset = dataset.map(lambda example: crop_example(None, example), num_parallel_calls=tf.data.AUTOTUNE)
  if check_decode:
    dataset = counter.drop_unless(dataset, lambda example, decoded: decoded, "undecodable_image")
    dataset = dataset.map(lambda example, decoded: example)
  dataset = dataset.batch(local_batch, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE)
  # Sequential: a few ms per batch, and no float32 batches in flight beyond the prefetched ones.
  dataset = dataset.enumerate().map(finish_batch).prefetch(PREFETCH_BATCHES)

  options = tf.data.Options()
  options.deterministic = True
  # The skip counters' variables and the decoder's inner dataset hold no position to save: a
  # restored iterator resumes exactly, and only the (per-run, logged) skip counts start again.
  options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
  dataset = dataset.with_options(options)
  # What this stream depends on: DataIterator saves it with each checkpoint and refuses to restore
  # a position into a stream built differently (data_dir alone may move).
  dataset.settings = {**{k: v for k, v in data.to_dict().items() if k != "data_dir"},
                      "seed": config.seed, "split": split, "train": train,
                      "process_index": process_index, "process_count": process_count,
                      "vocab_size": tokenizer.vocab_size if tokenizer else None}
  dataset.skip_counter = counter  # DataIterator logs its counts
  return dataset


def _log_eval_remainder(dataset, local_batch, name, split):
  examples = int(dataset.cardinality())
  if examples >= 0 and examples % local_batch:
    logging.warning("Eval on %s/%s: %d examples in this process's part; the last %d do not fill a batch "
                    "of %d and are dropped", name, split, examples, examples % local_batch, local_batch)
  elif examples < 0:
    logging.info("Eval on %s/%s: size unknown; a final partial batch of %d is dropped",
                 name, split, local_batch)


class DataIterator:
  """Iterates a create_dataset() dataset as dicts of numpy arrays; checkpoints its exact position.

    iterator = DataIterator(dataset)
    batch = next(iterator)
    iterator.save(checkpoint_dir)     # on every process, next to the train state
    ...
    iterator = DataIterator(create_dataset(...same config...))
    iterator.restore(checkpoint_dir)  # the next batch is bit-identical to the uninterrupted run's

  Beside each checkpoint, `iterator.settings.json` records the stream's settings (config.data,
  seed, split, process index and count, vocab size); restoring into a stream built with other
  settings raises DataError naming the fields that differ.
  """

  def __init__(self, dataset, process_index=None):
    self.settings = getattr(dataset, "settings", None)  # set by create_dataset
    self.skip_counter = getattr(dataset, "skip_counter", None)
    if process_index is None:
      if self.settings:
        process_index = self.settings["process_index"]
      else:
        import jax  # pylint: disable=g-import-not-at-top
        process_index = jax.process_index()
    self.process_index = process_index
    self._iterator = iter(dataset)
    self._checkpoint = tf.train.Checkpoint(iterator=self._iterator)

  def __iter__(self):
    return self

  def __next__(self):
    try:
      batch = next(self._iterator)
    except StopIteration:
      self.log_skips()  # the end of an eval pass
      raise
    return {name: value.numpy() for name, value in batch.items()}

  def log_skips(self):
    """Logs how many examples this process dropped so far, by reason (e.g. undecodable images)."""
    if self.skip_counter is not None:
      self.skip_counter.log()

  def checkpoint_prefix(self, directory):
    return os.path.join(os.fspath(directory), f"process_{self.process_index}", "iterator")

  def save(self, directory):
    """Writes this process's position under directory/process_<i>/; returns the checkpoint prefix."""
    prefix = self._checkpoint.write(self.checkpoint_prefix(directory))
    self.log_skips()
    if self.settings is not None:
      with tf.io.gfile.GFile(prefix + ".settings.json", "w") as f:
        f.write(json.dumps(self.settings, indent=1, sort_keys=True))
    return prefix

  def restore(self, directory):
    """Moves to the position saved under directory/process_<i>/ by an iterator of the same pipeline."""
    prefix = self.checkpoint_prefix(directory)
    if not tf.io.gfile.exists(prefix + ".index"):
      raise DataError(f"no data iterator checkpoint at {prefix!r} (expected {prefix}.index)")
    if self.settings is not None and tf.io.gfile.exists(prefix + ".settings.json"):
      with tf.io.gfile.GFile(prefix + ".settings.json") as f:
        saved = json.load(f)
      now = json.loads(json.dumps(self.settings))  # tuples -> lists, as they were saved
      changed = {key: (saved.get(key), now.get(key)) for key in sorted(set(saved) | set(now))
                 if saved.get(key) != now.get(key)}
      if changed:
        raise DataError(f"data iterator checkpoint {prefix!r} was saved by another pipeline; "
                        f"(saved, now) differ in {changed}")
    try:
      self._checkpoint.read(prefix).assert_consumed()
    except (tf.errors.OpError, AssertionError) as e:
      raise DataError(f"data iterator checkpoint {prefix!r} does not fit this pipeline: {e}") from e
