"""The per-host pipeline on real tiny data: values, deterministic shuffling, host disjointness, resume."""

import collections
import hashlib
import logging
import pathlib

import numpy as np
import pytest
import tensorflow as tf

from mmjax.configs import common
from mmjax.errors import ConfigError, DataError
from mmjax.input_pipeline import datasets, pipeline, preprocess
from mmjax.input_pipeline import tokenizer as tokenizer_lib

NUM_SHAPES = 64


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  prefix = tmp_path_factory.mktemp("tok") / "spm"
  corpus = tokenizer_lib.cupl_sentences()[:3000]
  return tokenizer_lib.Tokenizer(tokenizer_lib.train_tokenizer(corpus, prefix, 256))


def _config(name="shapes", global_batch=8, **data):
  config = common.base_config()
  config.data = common.data_config(name=name, image_size=16, global_batch=global_batch, text_length=32)
  config.data.num_examples = NUM_SHAPES
  config.data.shuffle_buffer = 32
  config.data.update(data)
  return config


def _example_keys(dataset_or_batches):
  """A multiset of (caption, image hash) over every example of some batches."""
  keys = collections.Counter()
  for batch in dataset_or_batches:
    for image, caption in zip(batch["image"], batch["caption"]):
      keys[(bytes(caption), hashlib.sha1(np.asarray(image).tobytes()).hexdigest())] += 1
  return keys


def test_eval_batches_are_preprocessed_source_examples(data_dir, tokenizer):
  config = _config(pixel_map="dvae")
  batch = next(pipeline.DataIterator(
      pipeline.create_dataset(config, data_dir, tokenizer, train=False, process_index=0, process_count=1), 0))
  assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.float32
  assert batch["text_tokens"].shape == (8, 32) and batch["text_tokens"].dtype == np.int32
  source = datasets.source_dataset(config.data, data_dir, "train", 0, 1, preprocess.SkipCounter())
  for i, example in enumerate(source.take(8)):
    expected = preprocess.map_pixels(preprocess.resize_and_crop(example["image"], 16), "dvae").numpy()
    np.testing.assert_array_equal(batch["image"][i], expected)
    assert batch["caption"][i] == example["caption"].numpy()
  assert 0.1 - 1e-6 <= batch["image"].min() and batch["image"].max() <= 0.9 + 1e-6
  np.testing.assert_array_equal(batch["text_tokens"], tokenizer.tokenize(batch["caption"], "dalle", 32))


def test_clip_layout_and_no_tokenizer(data_dir, tokenizer):
  config = _config(pixel_map="clip")
  config.data.text_layout = "clip"
  config.data.text_length = 64  # room for every caption, so decoding gives it back whole
  batch = next(pipeline.DataIterator(
      pipeline.create_dataset(config, data_dir, tokenizer, train=True, process_index=0, process_count=1), 0))
  tokens = batch["text_tokens"]
  assert (tokens[:, 0] == tokenizer.bos_id).all()
  eot = tokenizer_lib.eot_index(tokens)
  assert (tokens[np.arange(8), eot] == tokenizer.eos_id).all()
  assert [tokenizer.decode(row) for row in tokens] == [c.decode().lower() for c in batch["caption"]]
  batch = next(pipeline.DataIterator(
      pipeline.create_dataset(config, data_dir, None, train=True, process_index=0, process_count=1), 0))
  assert sorted(batch) == ["caption", "image"]


def test_grayscale_applies_to_training_only(data_dir, tokenizer):
  colours = "red,green,blue,yellow,magenta,cyan,white"
  config = _config(pixel_map="unit", grayscale_prob=1.0, grayscale_words=colours)
  train = next(pipeline.DataIterator(
      pipeline.create_dataset(config, data_dir, tokenizer, train=True, process_index=0, process_count=1), 0))
  assert (train["image"] == train["image"][..., :1]).all() and train["image"].max() > 0
  for caption in train["caption"]:
    assert not set(caption.decode().split()) & set(colours.split(","))
  np.testing.assert_array_equal(train["text_tokens"], tokenizer.tokenize(train["caption"], "dalle", 32))
  evaluation = next(pipeline.DataIterator(
      pipeline.create_dataset(config, data_dir, tokenizer, train=False, process_index=0, process_count=1), 0))
  assert (evaluation["image"] != evaluation["image"][..., :1]).any()


def test_training_epochs_are_seeded_permutations(data_dir, tokenizer):
  def epochs(seed):
    config = _config(random_crop=False)
    config.seed = seed
    iterator = pipeline.DataIterator(
        pipeline.create_dataset(config, data_dir, tokenizer, train=True, process_index=0, process_count=1), 0)
    batches = [next(iterator) for _ in range(2 * NUM_SHAPES // 8)]
    return batches[:NUM_SHAPES // 8], batches[NUM_SHAPES // 8:]

  first, second = epochs(seed=0)
  everything = _example_keys(pipeline.create_dataset(
      _config(global_batch=1), data_dir, None, train=False, process_index=0, process_count=1).as_numpy_iterator())
  assert _example_keys(first) == everything == _example_keys(second)  # each epoch: every example once
  order = lambda batches: [c for b in batches for c in b["caption"]]  # noqa: E731
  assert order(first) != order(second)  # reshuffled each epoch
  again, _ = epochs(seed=0)
  assert order(again) == order(first)
  other, _ = epochs(seed=1)
  assert order(other) != order(first)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
  """24 non-square noise images with sidecar captions, so random crops really move."""
  folder = tmp_path_factory.mktemp("photos")
  rng = np.random.default_rng(0)
  for i in range(24):
    image = rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)
    tf.io.write_file(str(folder / f"img{i:02d}.png"), tf.io.encode_png(image))
    (folder / f"img{i:02d}.txt").write_text(f"picture number {i}")
  return str(folder)


@pytest.fixture(scope="module")
def photo_records(photo_folder, tmp_path_factory):
  """The same 24 photos in 4 TFRecord files, plus one record that does not decode."""
  folder = pathlib.Path(photo_folder)
  records = [((folder / f"img{i:02d}.png").read_bytes(), f"picture number {i}") for i in range(24)]
  records.insert(5, (b"not an image", "a broken picture"))
  prefix = tmp_path_factory.mktemp("records") / "photos"
  writers = [tf.io.TFRecordWriter(f"{prefix}-{i}.tfrecord") for i in range(4)]
  for i, (image_bytes, caption) in enumerate(records):
    example = tf.train.Example(features=tf.train.Features(feature={
        "jpg": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_bytes])),
        "txt": tf.train.Feature(bytes_list=tf.train.BytesList(value=[caption.encode()]))}))
    writers[i % 4].write(example.SerializeToString())
  for writer in writers:
    writer.close()
  return f"{prefix}-*.tfrecord"


@pytest.mark.parametrize("name", ["shapes", "folder", "tfrecord"])
def test_restored_iterator_continues_bit_identically(name, data_dir, photo_folder, photo_records, tokenizer,
                                                     tmp_path):
  path = photo_records if name == "tfrecord" else photo_folder
  # Grey draws are keyed on the batch index: a restored iterator greys the same rows.
  config = _config(name, random_crop=True, path=path, grayscale_prob=0.5, grayscale_words="red,blue")
  make = lambda: pipeline.DataIterator(  # noqa: E731
      pipeline.create_dataset(config, data_dir, tokenizer, train=True, process_index=1, process_count=2), 1)
  iterator = make()
  for _ in range(3):
    next(iterator)
  prefix = iterator.save(tmp_path / "ckpt")
  assert "process_1" in prefix
  expected = [next(iterator) for _ in range(6)]  # runs past the end of the first epoch
  fresh = next(make())
  restored = make()
  restored.restore(tmp_path / "ckpt")
  for want, got in zip(expected, [next(restored) for _ in range(6)]):
    assert sorted(want) == sorted(got) == ["caption", "image", "text_tokens"]
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])
  assert not np.array_equal(fresh["image"], expected[0]["image"])
  if name == "tfrecord":  # this host's 13 records hold the broken one: 9 batches of 4 pass it twice
    assert iterator.skip_counter.counts()["undecodable_image"] >= 2


def test_iterator_checkpoint_holds_encoded_images(tmp_path):
  """The shuffle buffer keeps PNG bytes (~1 KB for a flat 200 px image), not 120 KB decoded."""
  for i in range(24):
    image = np.full((200, 200, 3), (10 * i, 255 - 10 * i, 7), np.uint8)
    tf.io.write_file(str(tmp_path / "photos" / f"flat{i:02d}.png"), tf.io.encode_png(image))
    (tmp_path / "photos" / f"flat{i:02d}.txt").write_text(f"flat colour {i}")
  config = _config("folder", path=str(tmp_path / "photos"), global_batch=2, shuffle_buffer=24)
  iterator = pipeline.DataIterator(
      pipeline.create_dataset(config, "", None, train=True, process_index=0, process_count=1), 0)
  next(iterator)
  iterator.save(tmp_path / "ckpt")
  size = sum(f.stat().st_size for f in (tmp_path / "ckpt").rglob("*") if f.is_file())
  assert size < 24 * 200 * 200 * 3 // 4  # a buffer of decoded images alone would be 2.9 MB


def test_random_crops_depend_on_the_seed(photo_folder):
  def first_images(seed):
    config = _config("folder", random_crop=True, path=photo_folder, global_batch=24, shuffle_buffer=1)
    config.seed = seed
    return next(pipeline.create_dataset(config, "", None, train=True, process_index=0, process_count=1)
                .as_numpy_iterator())

  first, again, other = first_images(0), first_images(0), first_images(1)
  np.testing.assert_array_equal(first["image"], again["image"])
  assert list(first["caption"]) == list(other["caption"])  # shuffle_buffer=1 keeps file order
  assert not np.array_equal(first["image"], other["image"])  # the same photos, cropped elsewhere


@pytest.mark.parametrize("name,split", [("shapes", "train"), ("digits", "validation")])
def test_hosts_read_disjoint_parts_that_cover_the_split(data_dir, name, split):
  def keys(process_index, process_count):
    dataset = pipeline.create_dataset(_config(name, global_batch=process_count), data_dir, None, train=False,
                                      process_index=process_index, process_count=process_count, split=split)
    return _example_keys(dataset.as_numpy_iterator())

  whole, first, second = keys(0, 1), keys(0, 2), keys(1, 2)
  assert first + second == whole  # a partition of the multiset of examples
  assert abs(sum(first.values()) - sum(second.values())) <= 1
  assert sum(whole.values()) == (NUM_SHAPES if name == "shapes" else 179)


def test_folder_hosts_are_disjoint(photo_folder):
  config = _config("folder", global_batch=2, path=photo_folder)
  read = lambda index: {  # noqa: E731
      c for b in pipeline.create_dataset(config, "", None, train=False, process_index=index, process_count=2)
      .as_numpy_iterator() for c in b["caption"]}
  first, second = read(0), read(1)
  assert not first & second
  assert first | second == {f"picture number {i}".encode() for i in range(24)}


def test_errors_name_the_config_field(data_dir, tmp_path):
  with pytest.raises(ConfigError, match=r"config\.data\.global_batch=9"):
    pipeline.create_dataset(_config(global_batch=9), data_dir, None, train=True, process_index=0, process_count=2)
  with pytest.raises(ConfigError, match=r"config\.data\.name='imagenet'"):
    pipeline.create_dataset(_config("imagenet"), data_dir, None, train=True, process_index=0, process_count=1)
  iterator = pipeline.DataIterator(
      pipeline.create_dataset(_config(), data_dir, None, train=True, process_index=0, process_count=1), 0)
  with pytest.raises(DataError, match="process_0"):
    iterator.restore(tmp_path / "nothing_here")
  next(iterator)
  iterator.save(tmp_path / "ckpt")
  other = pipeline.DataIterator(
      pipeline.create_dataset(_config(global_batch=4), data_dir, None, train=True, process_index=0, process_count=1))
  with pytest.raises(DataError, match=r"'global_batch': \(8, 4\)"):
    other.restore(tmp_path / "ckpt")


def test_dataset_captions_for_a_tokenizer_corpus(data_dir):
  config = _config()
  captions = datasets.captions(config.data, data_dir, limit=10)
  source = datasets.source_dataset(config.data, data_dir, "train", 0, 1, preprocess.SkipCounter())
  assert captions == [example["caption"].decode() for example in source.take(10).as_numpy_iterator()]
  assert len(datasets.captions(config.data, data_dir)) == NUM_SHAPES


def test_dropped_examples_are_counted_and_logged(photo_folder, tmp_path, caplog):
  for i in range(3):
    (tmp_path / f"img{i}.png").write_bytes((pathlib.Path(photo_folder) / f"img{i:02d}.png").read_bytes())
    (tmp_path / f"img{i}.txt").write_text(f"picture number {i}")
  (tmp_path / "broken.png").write_bytes(b"not a png")
  (tmp_path / "broken.txt").write_text("a broken picture")
  config = _config("folder", global_batch=1, path=str(tmp_path))
  iterator = pipeline.DataIterator(
      pipeline.create_dataset(config, "", None, train=False, process_index=0, process_count=1))
  with caplog.at_level(logging.WARNING):
    captions = [batch["caption"][0] for batch in iterator]
  assert sorted(captions) == [f"picture number {i}".encode() for i in range(3)]
  assert iterator.skip_counter.counts()["undecodable_image"] == 1
  assert "skipped 1 examples" in caplog.text
