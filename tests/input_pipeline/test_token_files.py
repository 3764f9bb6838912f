"""Token files: records written with the encode job's writer read back exactly once per process split."""

import collections
import os

import numpy as np
import pytest
import tensorflow as tf

from mmjax.errors import DataError
from mmjax.input_pipeline import token_files

GRID, TEXT_LENGTH, PER_SHARD = 3, 5, 4


def _rows(process_index, count):
  """Distinct rows: image tokens encode (process, example), text tokens and caption too."""
  for i in range(count):
    key = 1000 * process_index + i
    yield (np.arange(GRID * GRID) + key, np.full(TEXT_LENGTH, key) - np.arange(TEXT_LENGTH),
           f"caption {key} ✓")


def _write_split(directory, split, sizes):
  """Writes `sizes[p]` examples for each host p as the encode job lays them out; returns the rows."""
  written = []
  for process_index, size in enumerate(sizes):
    rows = list(_rows(process_index, size))
    for shard, start in enumerate(range(0, size, PER_SHARD)):
      path = token_files.shard_path(directory, split, process_index, len(sizes), shard)
      with tf.io.TFRecordWriter(path) as writer:
        for row in rows[start:start + PER_SHARD]:
          writer.write(token_files.serialize_example(*row))
    written.extend(rows)
  return written


def _metadata(splits):
  return {"format": token_files.FORMAT, "version": token_files.VERSION, "grid_height": GRID,
          "grid_width": GRID, "text_length": TEXT_LENGTH, "splits": splits}


@pytest.fixture
def token_dir(tmp_path):
  rows = _write_split(tmp_path, "train", [6, 5])
  _write_split(tmp_path, "test", [2, 1])
  files = len(token_files.split_files(tmp_path, "train"))
  token_files.write_json(os.path.join(tmp_path, token_files.METADATA_FILE),
                         _metadata({"train": {"examples": 11, "files": files}}))
  return tmp_path, rows


def _read(dataset):
  return [(tuple(ex["image_tokens"]), tuple(ex["text_tokens"]), ex["caption"].decode())
          for ex in dataset.as_numpy_iterator()]


def _keys(rows):
  return [(tuple(int(v) for v in image), tuple(int(v) for v in text), caption) for image, text, caption in rows]


def test_one_reader_gets_every_record_in_split_order(token_dir):
  directory, rows = token_dir
  dataset = token_files.token_dataset(str(directory), "train", 0, 1)
  spec = dataset.element_spec
  assert spec["image_tokens"].shape == (GRID * GRID,) and spec["image_tokens"].dtype.name == "int32"
  assert spec["text_tokens"].shape == (TEXT_LENGTH,) and spec["text_tokens"].dtype.name == "int32"
  assert _read(dataset) == _keys(rows)  # host 0's part, then host 1's, each in order


@pytest.mark.parametrize("process_count", [2, 3, 7])
def test_readers_split_the_records_exactly_once(token_dir, process_count):
  # 4 files: 2 and 3 readers get whole files; 7 readers get every 7th record.
  directory, rows = token_dir
  parts = [_read(token_files.token_dataset(str(directory), "train", p, process_count))
           for p in range(process_count)]
  union = collections.Counter(row for part in parts for row in part)
  assert union == collections.Counter(_keys(rows))
  assert sum(map(len, parts)) == 11


def test_a_glob_reads_the_files_it_matches(token_dir):
  directory, rows = token_dir
  pattern = os.path.join(str(directory), "train-host00001-*.tfrecord")
  assert _read(token_files.token_dataset(pattern, None, 0, 1)) == _keys(rows[6:])


def test_unfinished_or_incomplete_splits_and_missing_metadata_fail_clearly(token_dir, tmp_path_factory):
  directory, _ = token_dir
  with pytest.raises(DataError, match=r"split 'test' is not finished .*\['train'\]"):
    token_files.token_dataset(str(directory), "test", 0, 1)
  os.remove(token_files.shard_path(directory, "train", 1, 2, 1))
  with pytest.raises(DataError, match="split 'train' has 3 shard files, metadata.json says 4"):
    token_files.token_dataset(str(directory), "train", 0, 1)
  empty = tmp_path_factory.mktemp("empty")
  with pytest.raises(DataError, match="no metadata.json"):
    token_files.token_dataset(str(empty), "train", 0, 1)
  with pytest.raises(DataError, match="process_index=2 is outside"):
    token_files.token_dataset(str(directory), "train", 2, 2)


def test_host_shards_and_atomic_json(tmp_path):
  _write_split(tmp_path, "train", [9, 1])
  assert sorted(token_files.host_shards(tmp_path, "train", 0, 2)) == [0, 1, 2]
  assert token_files.count_records(token_files.shard_path(tmp_path, "train", 0, 2, 2)) == 1
  path = os.path.join(tmp_path, "x.json")
  token_files.write_json(path, {"a": [1, 2]})
  assert token_files.read_json(path) == {"a": [1, 2]} and not os.path.exists(path + ".tmp")
