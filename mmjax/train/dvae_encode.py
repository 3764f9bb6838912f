"""The dVAE encode job: every example of the configured splits → argmax dVAE codes + text tokens.

  python -m mmjax.main --config=mmjax/configs/dvae_encode.py --workdir=DIR

Reads top to bottom: mesh → exported dVAE (params restored straight into their shardings) →
tokenizer → per split: this host's part of the data in file order → global batches on the mesh →
jitted `encode_tokens` → this host's rows written to its own token shards
(mmjax/input_pipeline/token_files.py describes the files and metadata.json).

Exactly once: TFDS hosts read disjoint contiguous parts of a split (sizes may differ by one), and
folder/tfrecord hosts disjoint files; every host feeds full local batches (the last one padded,
then all-padding batches once its part is done) until a step holds no valid row on any host, so
all hosts run the same collectives and only valid rows are written.

Resumable: each host writes `config.examples_per_shard` examples per file, via a temporary name
and a rename. A rerun keeps the finished shards, skips that many examples of the host's stream
and goes on; a host's part ends with a `.done.json` marker, and a split every host has finished
is listed in metadata.json and skipped by later runs. `config.max_shards_per_run` stops a run
early (the job resumes where it stopped). Output written with other settings (dVAE, tokenizer,
image size, process count, shard size, ...) is refused rather than mixed.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from mmjax import sharding
from mmjax.errors import ConfigError, DataError
from mmjax.input_pipeline import datasets, preprocess, token_files
from mmjax.models import dvae
from mmjax.train import checkpoint, workdir as workdir_lib

SETTINGS_KEYS = ("format", "version", "grid_height", "grid_width", "image_vocab_size", "image_size",
                 "text_length", "text_layout", "text_vocab_size", "tokenizer_sha256", "dvae_model",
                 "dataset", "process_count", "examples_per_shard")


# ----------------------------------------------------------------------------- the model

def load_dvae(directory, mesh, rules, need, dtype=""):
  """(module, params, param shardings, model_config) of an exported dVAE, params restored straight
  into their shardings on `mesh`.

  need: "encoder" or "decoder", the half the caller runs (an export may hold only one).
  dtype: "" keeps the exported compute dtype; e.g. "float32" overrides it.
  """
  if not tf.io.gfile.exists(os.fspath(directory)):
    raise DataError(f"dVAE checkpoint {directory!r} does not exist; expected an exported dVAE "
                    "(params/ + model.json from the dVAE trainer or convert_openai_dvae)")
  model_config = checkpoint.load_model_config(directory, kind=dvae.KIND)
  parts = list(model_config.get("parts", ["encoder", "decoder"]))
  if need not in parts:
    raise DataError(f"dVAE checkpoint {directory!r} holds only {parts}; this needs the {need}")
  model = dvae.from_model_config(model_config, **({"dtype": dtype} if dtype else {}))
  size = 2 ** (model.group_count - 1)
  images = jnp.zeros((1, size, size, model.input_channels), jnp.float32)

  def init_params():
    variables = model.init(jax.random.key(0), images, temperature=1.0, rng=None, deterministic=True)
    return {part: variables["params"][part] for part in parts}

  abstract, shardings = sharding.abstract_sharded_state(init_params, mesh, rules)
  params, _ = checkpoint.load_model(directory, kind=dvae.KIND, abstract_params=abstract)
  return model, params, shardings, model_config


# What an export that records no image_size was trained at: OpenAI's released dVAE (converted
# weights) saw 256 px images.
DEFAULT_IMAGE_SIZE = 256


def trained_image_size(model_config):
  """The square image size a dVAE export was trained at: model.json's "image_size" (written by the
  dVAE trainer), else DEFAULT_IMAGE_SIZE."""
  return int(model_config.get("image_size") or DEFAULT_IMAGE_SIZE)


def grid_size(model, image_size, field="config.data.image_size"):
  factor = 2 ** (model.group_count - 1)
  if image_size <= 0 or image_size % factor:
    raise ConfigError(f"{field}={image_size}: the dVAE (group_count={model.group_count}) needs a "
                      f"positive multiple of {factor}")
  return image_size // factor


def encode_step(model, param_shardings, mesh, rules):
  """jit(params, images, valid) → (codes int32 [B, h, w], number of valid rows), batch-sharded."""
  batch = sharding.batch_sharding(mesh, rules)

  def encode(params, images, valid):
    codes = model.apply({"params": params}, images, method=dvae.DVAE.encode_tokens)
    return codes, jnp.sum(valid.astype(jnp.int32))

  return jax.jit(encode, in_shardings=(param_shardings, batch, batch),
                 out_shardings=(batch, NamedSharding(mesh, PartitionSpec())))


def local_rows(global_array):
  """This process's rows of a batch-sharded array, in global row order (replicas counted once)."""
  blocks = {shard.index[0].start or 0: shard.data for shard in global_array.addressable_shards}
  return np.concatenate([np.asarray(blocks[start]) for start in sorted(blocks)])


def local_row_order(local_batch, mesh, rules):
  """Indices that put `local_rows(output)` back in the order this host fed its local batch.

  Found once by feeding row numbers: where a host's rows land in the global batch is up to the
  mesh (its batch shards need not be contiguous), and the same for every step.
  """
  fed = sharding.make_global_batch({"row": np.arange(local_batch, dtype=np.int32)}, mesh, rules)["row"]
  return np.argsort(local_rows(fed))


# ----------------------------------------------------------------------------- data

def host_batches(config, data_dir, split, tokenizer, image_size, local_batch, skip_examples,
                 process_index, process_count, counter):
  """This host's part of `split` from example `skip_examples` on, in file order, as numpy batches
  {"image": dVAE-mapped float32 [b, S, S, 3], "text_tokens": int32 [b, L], "caption": [b]};
  the last batch may be short (b < local_batch)."""
  data = config.data
  # TFDS bytes always decode, so their skip passes over stored bytes only. Users' folder/TFRecord
  # images are decoded by the source, which drops (and counts) undecodable ones: the skip must
  # count the examples that were written, so it comes after that drop.
  tfds_source = data.name in datasets.TFDS_NAMES
  dataset = datasets.source_dataset(data, data_dir, split, process_index, process_count, counter,
                                    seed=None, decode_images=not tfds_source)
  if skip_examples:
    dataset = dataset.skip(skip_examples)

  def resize(example):
    image = example["image"]
    if image.dtype == tf.string:
      image = preprocess.decode_image(image)
    return {"image": preprocess.resize_and_crop(image, image_size), "caption": example["caption"]}

  def finish(batch):
    return {"image": preprocess.map_pixels(batch["image"], "dvae"), "caption": batch["caption"],
            "text_tokens": tokenizer.tf_tokenize(batch["caption"], data.text_layout, data.text_length)}

  dataset = dataset.map(resize, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  dataset = dataset.batch(local_batch, drop_remainder=False).map(finish).prefetch(2)
  return dataset.as_numpy_iterator()


def pad_batch(batch, local_batch, image_size):
  """A full local batch plus a `valid` mask; `batch=None` (this host is done) gives all padding."""
  rows = 0 if batch is None else len(batch["image"])
  valid = np.arange(local_batch) < rows
  image = np.zeros((local_batch, image_size, image_size, 3), np.float32)
  if rows:
    image[:rows] = batch["image"]
  return image, valid


# ----------------------------------------------------------------------------- host progress

def _all_hosts(values):
  """[process_count, ...] array of every host's `values` (a collective: every host must call it)."""
  values = np.asarray(values)
  if jax.process_count() == 1:
    return values[None]
  return np.asarray(multihost_utils.process_allgather(values))


class HostShards:
  """One host's token shards of one split: resumes after its finished files, writes the rest."""

  def __init__(self, output_dir, split, examples_per_shard):
    self.output_dir, self.split, self.examples_per_shard = output_dir, split, examples_per_shard
    self.process_index, self.process_count = jax.process_index(), jax.process_count()
    self.name = f"{split} (host {self.process_index} of {self.process_count})"
    self._writer, self._rows_in_shard = None, 0
    self.shards, self.examples, self.done, self.skipped = self._resume()

  def _path(self, shard):
    return token_files.shard_path(self.output_dir, self.split, self.process_index, self.process_count, shard)

  def _done_path(self):
    return token_files.done_path(self.output_dir, self.split, self.process_index, self.process_count)

  def _resume(self):
    """(finished shards to keep, examples in them, whether this host's part is done, skip counts)."""
    if tf.io.gfile.exists(self._done_path()):
      done = token_files.read_json(self._done_path())
      return done["shards"], done["examples"], True, done.get("skipped", {})
    existing = token_files.host_shards(self.output_dir, self.split, self.process_index, self.process_count)
    shards = 0
    while shards in existing:
      shards += 1
    if shards and token_files.count_records(self._path(shards - 1)) < self.examples_per_shard:
      shards -= 1  # a short last shard without a done marker: written again, to finish properly
    if len(existing) > shards:
      logging.info("%s: %d later shard file(s) will be written again", self.name, len(existing) - shards)
    if shards:
      logging.info("%s: resuming after %d finished shard(s) (%d examples), skipping them",
                   self.name, shards, shards * self.examples_per_shard)
    return shards, shards * self.examples_per_shard, False, {}

  def add(self, image_tokens, text_tokens, captions):
    """Appends rows; closes a shard (temporary file → rename) each time it holds examples_per_shard."""
    for row in zip(image_tokens, text_tokens, captions):
      if self._writer is None:
        self._writer = tf.io.TFRecordWriter(self._path(self.shards) + ".tmp")
      self._writer.write(token_files.serialize_example(*row))
      self._rows_in_shard += 1
      if self._rows_in_shard == self.examples_per_shard:
        self._close_shard()

  def _close_shard(self):
    if self._writer is None:
      return
    self._writer.close()
    path = self._path(self.shards)
    tf.io.gfile.rename(path + ".tmp", path, overwrite=True)
    self.shards += 1
    self.examples += self._rows_in_shard
    self._writer, self._rows_in_shard = None, 0

  def finish(self, skipped):
    """This host's part is fully read: close the short last shard and write the done marker."""
    self._close_shard()
    self.done, self.skipped = True, skipped
    token_files.write_json(self._done_path(), {"examples": self.examples, "shards": self.shards,
                                               "skipped": skipped})

  def stop(self):
    """A run ends early: keep what is complete (a short shard only exists at the end of the part)."""
    self._close_shard()


# ----------------------------------------------------------------------------- the job

def _splits(config):
  splits = [s.strip() for s in str(config.splits).split(",") if s.strip()]
  if not splits:
    raise ConfigError("config.splits is empty: name the splits to encode, e.g. 'train,validation'")
  if config.data.name in ("folder", "tfrecord") and len(splits) > 1:
    raise ConfigError(f"config.splits={config.splits!r}: data.name={config.data.name!r} reads all of "
                      "config.data.path whatever the split, so name one split (e.g. 'train')")
  return splits


def _absolute(path):
  path = os.fspath(path)
  return path if "://" in path else os.path.abspath(path)


def _settings(config, model, model_config, image_size, tokenizer, checkpoint_dir):
  grid = grid_size(model, image_size)
  return {
      "format": token_files.FORMAT, "version": token_files.VERSION,
      "grid_height": grid, "grid_width": grid, "image_vocab_size": model.vocab_size,
      "image_size": image_size, "text_length": config.data.text_length,
      "text_layout": config.data.text_layout, "text_vocab_size": tokenizer.vocab_size,
      "tokenizer_path": _absolute(tokenizer.model_path),
      "tokenizer_sha256": token_files.file_sha256(tokenizer.model_path),
      "dvae_checkpoint": _absolute(checkpoint_dir), "dvae_model": model_config,
      "dataset": {"name": config.data.name, "path": config.data.path,
                  "num_examples": config.data.num_examples},
      "process_count": jax.process_count(), "examples_per_shard": config.examples_per_shard,
      "splits": {},
  }


def _open_output(output_dir, settings):
  """Checks earlier output in `output_dir` was written with the same settings; returns the metadata."""
  tf.io.gfile.makedirs(output_dir)
  path = os.path.join(output_dir, token_files.METADATA_FILE)
  metadata = dict(settings)
  differences = []
  if tf.io.gfile.exists(path):
    earlier = token_files.read_json(path)
    differences = [f"{key}: {earlier.get(key)!r} then, {settings[key]!r} now"
                   for key in SETTINGS_KEYS if earlier.get(key) != settings[key]]
    metadata["splits"] = earlier.get("splits", {})
  # Every host agrees before any raises, so none is left waiting in a collective.
  if _all_hosts([len(differences)]).max():
    reason = "; ".join(differences) if differences else "see the log of another host"
    raise DataError(f"config.output_dir={output_dir!r} holds tokens written with other settings "
                    f"({reason[:600]}); use a new output directory or delete it")
  return metadata


def _leftover_temporaries(output_dir, split):
  pattern = os.path.join(output_dir, f"{split}-host{jax.process_index():05d}-of-*.tmp")
  leftovers = tf.io.gfile.glob(pattern)
  for path in leftovers:
    tf.io.gfile.remove(path)
  if leftovers:
    logging.info("%s: removed %d unfinished temporary file(s) of an interrupted run", split, len(leftovers))


def encode_split(config, split, *, step, params, mesh, rules, tokenizer, image_size, local_batch,
                 data_dir, output_dir, max_steps):
  """Encodes one split; returns (finished, per-host [examples, shards, skipped] rows)."""
  shards = HostShards(output_dir, split, config.examples_per_shard)
  if _all_hosts([shards.done]).all():
    counts = _all_hosts([shards.examples, shards.shards, sum(shards.skipped.values())])
    logging.info("Split %s already finished (%d examples in %d files): skipped", split,
                 counts[:, 0].sum(), counts[:, 1].sum())
    return True, counts
  _leftover_temporaries(output_dir, split)
  counter = preprocess.SkipCounter(shards.name)
  batches = iter(())
  if not shards.done:
    batches = host_batches(config, data_dir, split, tokenizer, image_size, local_batch, shards.examples,
                           jax.process_index(), jax.process_count(), counter)
  row_order = local_row_order(local_batch, mesh, rules)
  logging.info("%s: encoding from example %d on, %d rows per step", shards.name, shards.examples, local_batch)
  steps = 0
  while max_steps is None or steps < max_steps:
    batch = next(batches, None)
    if batch is None and not shards.done:
      shards.finish(counter.counts())
      counter.log()
    image, valid = pad_batch(batch, local_batch, image_size)
    arrays = sharding.make_global_batch({"image": image, "valid": valid}, mesh, rules)
    codes, total_valid = step(params, arrays["image"], arrays["valid"])
    if int(total_valid) == 0:  # every host is done: this step was padding only
      break
    codes = local_rows(codes)[row_order]
    rows = int(valid.sum())
    if rows:
      shards.add(codes[:rows].reshape(rows, -1), batch["text_tokens"], batch["caption"])
    steps += 1
    if steps % 50 == 0:
      logging.info("%s: %d steps, %d examples written so far", shards.name, steps, shards.examples)
  finished = bool(_all_hosts([shards.done]).all())
  if not finished:
    shards.stop()
  counts = _all_hosts([shards.examples, shards.shards, sum(shards.skipped.values())])
  return finished, counts


def run(config, workdir):
  mesh = sharding.create_mesh(config.mesh)
  rules = sharding.validate_rules(config.logical_axis_rules, mesh)
  logging.info("Mesh %s over %d devices", dict(mesh.shape), mesh.size)
  if config.data.pixel_map != "dvae" or config.data.random_crop:
    raise ConfigError(f"config.data.pixel_map={config.data.pixel_map!r}, random_crop="
                      f"{config.data.random_crop}: the encode job maps pixels with 'dvae' and crops "
                      "at the centre; set pixel_map='dvae' and random_crop=False")
  splits = _splits(config)
  local_batch = sharding.process_batch_size(config.data.global_batch, mesh, rules)
  if config.examples_per_shard <= 0 or config.examples_per_shard % local_batch:
    raise ConfigError(f"config.examples_per_shard={config.examples_per_shard}: must be a positive multiple "
                      f"of the {local_batch} rows each process encodes per step "
                      f"(config.data.global_batch={config.data.global_batch} over {jax.process_count()} "
                      "process(es))")
  if config.max_shards_per_run < 0:
    raise ConfigError(f"config.max_shards_per_run={config.max_shards_per_run}: expected 0 (no limit) or more")

  checkpoint_dir = config.dvae_checkpoint or os.path.join(workdir, "dvae")
  model, params, param_shardings, model_config = load_dvae(checkpoint_dir, mesh, rules, "encoder",
                                                           config.dvae_dtype)
  image_size = config.data.image_size
  recorded = model_config.get("image_size")
  if recorded and recorded != image_size:  # the convolutions run at any size, but codes differ
    logging.warning("config.data.image_size=%d, but the dVAE in %s was trained at %d px", image_size,
                    checkpoint_dir, recorded)
  grid = grid_size(model, image_size)
  logging.info("dVAE %s: %d px images → %d×%d codes of %d", checkpoint_dir, image_size, grid, grid,
               model.vocab_size)
  data_dir = workdir_lib.prepare_data(config, workdir)
  tokenizer = workdir_lib.ensure_tokenizer(config, workdir)
  output_dir = config.output_dir or os.path.join(workdir, "tokens")
  metadata = _open_output(output_dir, _settings(config, model, model_config, image_size, tokenizer,
                                                checkpoint_dir))
  if jax.process_index() == 0:
    token_files.write_json(os.path.join(output_dir, token_files.METADATA_FILE), metadata)

  step = encode_step(model, param_shardings, mesh, rules)
  max_steps = None
  if config.max_shards_per_run:
    max_steps = config.max_shards_per_run * config.examples_per_shard // local_batch
  with sharding.mesh_and_rules(mesh, rules):
    for split in splits:
      finished, counts = encode_split(
          config, split, step=step, params=params, mesh=mesh, rules=rules, tokenizer=tokenizer,
          image_size=image_size, local_batch=local_batch, data_dir=data_dir, output_dir=output_dir,
          max_steps=max_steps)
      if not finished:
        logging.info("Stopped %s after config.max_shards_per_run=%d shard(s) per host; rerun to continue",
                     split, config.max_shards_per_run)
        return
      metadata["splits"][split] = {
          "examples": int(counts[:, 0].sum()), "files": int(counts[:, 1].sum()),
          "examples_per_process": [int(n) for n in counts[:, 0]],
          "skipped_examples": int(counts[:, 2].sum())}
      if jax.process_index() == 0:
        token_files.write_json(os.path.join(output_dir, token_files.METADATA_FILE), metadata)
      logging.info("Split %s: %d examples in %d files (%s per host, %d skipped)", split,
                   counts[:, 0].sum(), counts[:, 1].sum(), counts[:, 0].tolist(), counts[:, 2].sum())
  if jax.process_index() == 0:
    summary = ", ".join(f"{s}: {metadata['splits'][s]['examples']}" for s in splits)
    print(f"Wrote dVAE tokens to {output_dir} ({summary})")
