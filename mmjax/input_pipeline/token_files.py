"""dVAE token files: what the encode job (mmjax/train/dvae_encode.py) writes and the transformer reads.

Layout of an output directory (`config.output_dir` of the encode job):

  metadata.json                                        what the tokens mean (below)
  <split>-host00000-of-00002-shard00000.tfrecord      host 0's first `examples_per_shard` examples
  <split>-host00000-of-00002-shard00001.tfrecord      ...
  <split>-host00000-of-00002.done.json                 host 0 has written its whole part of <split>
  <split>-host00001-of-00002-shard00000.tfrecord      host 1's part, and so on

Each record is a tf.train.Example with
  image_tokens  int64 list, grid_height·grid_width argmax dVAE codes in row-major order
  text_tokens   int64 list, text_length ids in the tokenizer layout `text_layout`
  caption       bytes, the caption as the dataset gave it (UTF-8)

metadata.json holds grid_height, grid_width, image_vocab_size, image_size, text_length,
text_layout, text_vocab_size, tokenizer_path (+ its sha256), dvae_checkpoint, dvae_model (the
exported model.json), dataset, process_count, examples_per_shard, and under "splits" each finished
split's "examples", "files" and "examples_per_process". A split appears there only once every
host has written all of it. Shard names sort into the split's order: hosts read contiguous parts,
so one reader going through the files by name sees the examples in the dataset's order.

  dataset = token_dataset(output_dir, "train", process_index, process_count)
  # {"image_tokens": int32 [h·w], "text_tokens": int32 [L], "caption": tf.string}
"""

import hashlib
import json
import os
import re

import numpy as np
import tensorflow as tf

from mmjax.errors import DataError

METADATA_FILE = "metadata.json"
FORMAT = "mmjax-dvae-tokens"
VERSION = 1
FEATURE_KEYS = ("image_tokens", "text_tokens", "caption")
_SHARD = re.compile(r"-shard(\d{5})\.tfrecord$")


# ----------------------------------------------------------------------------- names

def _host_prefix(directory, split, process_index, process_count):
  return os.path.join(os.fspath(directory), f"{split}-host{process_index:05d}-of-{process_count:05d}")


def shard_path(directory, split, process_index, process_count, shard):
  """Where host `process_index` of `process_count` writes its `shard`-th file of `split`."""
  return f"{_host_prefix(directory, split, process_index, process_count)}-shard{shard:05d}.tfrecord"


def done_path(directory, split, process_index, process_count):
  """The marker a host writes once its whole part of `split` is in shard files."""
  return f"{_host_prefix(directory, split, process_index, process_count)}.done.json"


def host_shards(directory, split, process_index, process_count):
  """{shard number: path} of the finished shard files one host has written for `split`."""
  pattern = f"{_host_prefix(directory, split, process_index, process_count)}-shard*.tfrecord"
  return {int(_SHARD.search(path).group(1)): path for path in tf.io.gfile.glob(pattern)
          if _SHARD.search(path)}


def split_files(directory, split):
  """Every finished shard file of `split` (all hosts), sorted by name: host-major, then shard."""
  return sorted(tf.io.gfile.glob(os.path.join(os.fspath(directory), f"{split}-host*-shard*.tfrecord")))


# ----------------------------------------------------------------------------- writing

def _int64_feature(values):
  return tf.train.Feature(int64_list=tf.train.Int64List(value=np.asarray(values, np.int64).tolist()))


def serialize_example(image_tokens, text_tokens, caption):
  """One record: image_tokens [h·w] and text_tokens [L] (any ints), caption (str or bytes)."""
  caption = caption.encode("utf-8") if isinstance(caption, str) else bytes(caption)
  return tf.train.Example(features=tf.train.Features(feature={
      "image_tokens": _int64_feature(image_tokens),
      "text_tokens": _int64_feature(text_tokens),
      "caption": tf.train.Feature(bytes_list=tf.train.BytesList(value=[caption])),
  })).SerializeToString()


def write_text_atomically(path, text):
  """Writes `path` via a temporary file and a rename, so readers never see half a file."""
  temporary = f"{path}.tmp"
  with tf.io.gfile.GFile(temporary, "w") as f:
    f.write(text)
  tf.io.gfile.rename(temporary, path, overwrite=True)


def write_json(path, value):
  write_text_atomically(path, json.dumps(value, indent=1, sort_keys=True) + "\n")


def read_json(path):
  with tf.io.gfile.GFile(path) as f:
    try:
      return json.loads(f.read())
    except json.JSONDecodeError as e:
      raise DataError(f"{path}: not valid JSON ({e})") from e


def count_records(path):
  return sum(1 for _ in tf.data.TFRecordDataset(path))


def file_sha256(path):
  with tf.io.gfile.GFile(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


# ----------------------------------------------------------------------------- reading

def _metadata_path(path):
  path = os.fspath(path)
  if path.endswith(METADATA_FILE):
    return path
  if tf.io.gfile.isdir(path):
    return os.path.join(path, METADATA_FILE)
  return os.path.join(os.path.dirname(path), METADATA_FILE)  # a glob of shard files


def read_metadata(path):
  """The metadata of a token directory, its metadata.json, or a glob of shard files beside one."""
  metadata_path = _metadata_path(path)
  if not tf.io.gfile.exists(metadata_path):
    raise DataError(f"{path}: no {METADATA_FILE} at {metadata_path}; expected the output directory "
                    "of the dvae_encode job (or a glob of its shard files)")
  metadata = read_json(metadata_path)
  if metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
    raise DataError(f"{metadata_path}: format {metadata.get('format')!r} version {metadata.get('version')!r}, "
                    f"expected {FORMAT!r} version {VERSION}")
  return metadata


def _files_to_read(path, split, metadata):
  path = os.fspath(path)
  if tf.io.gfile.isdir(path):
    if split is None:
      raise DataError(f"{path}: name a split to read (finished: {sorted(metadata['splits'])})")
    if split not in metadata["splits"]:
      raise DataError(f"{path}: split {split!r} is not finished (metadata.json lists "
                      f"{sorted(metadata['splits'])}); run or resume the dvae_encode job")
    files = split_files(path, split)
    expected = metadata["splits"][split]["files"]
    if len(files) != expected:
      raise DataError(f"{path}: split {split!r} has {len(files)} shard files, metadata.json says {expected}")
    return files
  files = sorted(tf.io.gfile.glob(path))
  if not files:
    raise DataError(f"{path}: matches no token files")
  return files


def token_dataset(path, split=None, process_index=None, process_count=None):
  """This process's part of a split's token records, one pass, in file order.

  path: the encode job's output directory (then `split` is required and must be finished), or a
  glob of shard files next to its metadata.json (then `split` is ignored). Processes read
  disjoint parts that together hold every record once: whole files when there are at least as
  many files as processes, else every `process_count`-th record. Yields
  {"image_tokens": int32 [grid_height·grid_width], "text_tokens": int32 [text_length],
   "caption": tf.string}.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  if not 0 <= process_index < process_count:
    raise DataError(f"process_index={process_index} is outside [0, process_count={process_count})")
  metadata = read_metadata(path)
  files = _files_to_read(path, split, metadata)
  if len(files) >= process_count:
    records = tf.data.TFRecordDataset(files[process_index::process_count])
  else:
    records = tf.data.TFRecordDataset(files).shard(process_count, process_index)
  features = {
      "image_tokens": tf.io.FixedLenFeature([metadata["grid_height"] * metadata["grid_width"]], tf.int64),
      "text_tokens": tf.io.FixedLenFeature([metadata["text_length"]], tf.int64),
      "caption": tf.io.FixedLenFeature([], tf.string),
  }

  def parse(record):
    example = tf.io.parse_single_example(record, features)
    return {"image_tokens": tf.cast(example["image_tokens"], tf.int32),
            "text_tokens": tf.cast(example["text_tokens"], tf.int32),
            "caption": example["caption"]}

  return records.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
