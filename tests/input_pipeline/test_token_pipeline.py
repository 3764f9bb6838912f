"""Token batches for the transformer: encoded token files and the learnable synthetic set."""

import os

import numpy as np
import pytest
import tensorflow as tf

from mmjax.errors import ConfigError
from mmjax.input_pipeline import pipeline, token_files, token_pipeline

GRID, TEXT_LENGTH, IMAGE_VOCAB, TEXT_VOCAB = 2, 3, 16, 10


@pytest.fixture
def token_dir(tmp_path):
  """12 examples of one host in two shard files; image token 0 is the example's index."""
  for shard in range(2):
    with tf.io.TFRecordWriter(token_files.shard_path(tmp_path, "train", 0, 1, shard)) as writer:
      for i in range(6 * shard, 6 * shard + 6):
        writer.write(token_files.serialize_example([i, 1, 2, 3], [i % TEXT_VOCAB, 4, 5], f"c{i}"))
  token_files.write_json(os.path.join(tmp_path, token_files.METADATA_FILE), {
      "format": token_files.FORMAT, "version": token_files.VERSION, "grid_height": GRID,
      "grid_width": GRID, "text_length": TEXT_LENGTH, "image_vocab_size": IMAGE_VOCAB,
      "text_vocab_size": TEXT_VOCAB, "text_layout": "dalle",
      "splits": {"train": {"examples": 12, "files": 2}}})
  return str(tmp_path)


def test_eval_pass_is_in_order_and_drops_only_the_partial_batch(token_dir):
  dataset = token_pipeline.create_token_dataset(token_dir, "train", 5, train=False,
                                                process_index=0, process_count=1)
  batches = list(pipeline.DataIterator(dataset))
  assert [b["image_tokens"].shape for b in batches] == [(5, 4), (5, 4)]
  assert np.concatenate([b["image_tokens"][:, 0] for b in batches]).tolist() == list(range(10))
  assert batches[0]["text_tokens"].dtype == np.int32 and batches[0]["caption"][2] == b"c2"


def test_training_shuffles_repeats_and_resumes_exactly(token_dir, tmp_path):
  def make():
    return pipeline.DataIterator(token_pipeline.create_token_dataset(
        token_dir, "train", 4, train=True, seed=3, process_index=0, process_count=1))
  iterator = make()
  first = [next(iterator)["image_tokens"][:, 0] for _ in range(3)]  # one whole epoch
  assert sorted(np.concatenate(first).tolist()) == list(range(12))
  assert np.concatenate(first).tolist() != list(range(12))
  iterator.save(tmp_path / "ckpt")
  expected = [next(iterator)["image_tokens"] for _ in range(4)]
  restored = make()
  restored.restore(tmp_path / "ckpt")
  for want in expected:
    np.testing.assert_array_equal(next(restored)["image_tokens"], want)


def test_two_processes_read_disjoint_examples(token_dir):
  seen = []
  for process_index in range(2):
    dataset = token_pipeline.create_token_dataset(token_dir, "train", 6, train=False,
                                                  process_index=process_index, process_count=2)
    seen += [int(x) for b in pipeline.DataIterator(dataset) for x in b["image_tokens"][:, 0]]
  assert sorted(seen) == list(range(12))


def test_metadata_must_fit_the_model(token_dir):
  metadata = token_files.read_metadata(token_dir)
  token_pipeline.check_metadata(metadata, token_dir, TEXT_LENGTH, GRID, IMAGE_VOCAB, TEXT_VOCAB)
  with pytest.raises(ConfigError, match="grid_height: files 2, model 4.*image_vocab_size: files 16, model 8"):
    token_pipeline.check_metadata(metadata, token_dir, TEXT_LENGTH, 4, 8)
  with pytest.raises(ConfigError, match="global_batch=5 must be a positive multiple of the process count 2"):
    token_pipeline.create_token_dataset(token_dir, "train", 5, train=True, process_index=0, process_count=2)


def test_synthetic_tokens_follow_their_rule_and_differ_by_host():
  def first_batch(process_index):
    dataset = token_pipeline.synthetic_token_dataset(
        8, text_length=6, text_vocab_size=TEXT_VOCAB, num_image_tokens=9, image_vocab_size=IMAGE_VOCAB,
        num_words=2, process_index=process_index, process_count=2)
    return next(pipeline.DataIterator(dataset))
  batch = first_batch(0)
  text, image = batch["text_tokens"], batch["image_tokens"]
  assert text.shape == (4, 6) and image.shape == (4, 9)
  assert (text[:, :2] < TEXT_VOCAB).all()
  np.testing.assert_array_equal(text[:, 2:], np.broadcast_to(TEXT_VOCAB + np.arange(2, 6), (4, 4)))
  positions = np.arange(9)
  np.testing.assert_array_equal(image, (7 * text[:, positions % 6] + positions) % IMAGE_VOCAB)
  assert not np.array_equal(first_batch(1)["text_tokens"], text)
  with pytest.raises(ConfigError, match="num_words=7"):
    token_pipeline.synthetic_token_dataset(8, 6, TEXT_VOCAB, 9, IMAGE_VOCAB, num_words=7,
                                           process_index=0, process_count=1)
