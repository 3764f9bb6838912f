"""The dVAE encode job on real digits with a tiny random dVAE: codes, exactly-once hosts, resume."""

import collections
import os
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from mmjax.configs import dvae_encode as encode_config
from mmjax.errors import ConfigError, DataError
from mmjax.input_pipeline import datasets, preprocess, token_files
from mmjax.input_pipeline import tokenizer as tokenizer_lib
from mmjax.models import dvae
from mmjax.train import checkpoint, dvae_encode

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMAGE_SIZE, GRID, VOCAB, TEXT_LENGTH = 32, 8, 64, 16
SPLIT_SIZES = {"validation": 179, "test": 179}  # digits: stratified, fixed splits
PER_SHARD = 64


def save_tiny_dvae(directory, seed=0):
  """Exports a tiny dVAE (32 px → 8×8 codes of 64) with random params; returns (module, params).

  Params come from numpy (N(0, 1/fan_in) kernels, small random biases): compiling flax's
  initializers costs far more on CPU than these tests do.
  """
  model = dvae.DVAE(n_hid=16, n_blk_per_group=1, group_count=3, vocab_size=VOCAB, n_init=8, dtype=jnp.float32)
  images = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3))
  abstract = nn.unbox(jax.eval_shape(
      lambda: model.init(jax.random.key(0), images, temperature=1.0, rng=None, deterministic=True))["params"])
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    scale = 0.1 if path[-1].key == "bias" else 1 / np.sqrt(np.prod(leaf.shape[:-1]))
    return rng.normal(0, scale, leaf.shape).astype(np.float32)

  params = jax.tree_util.tree_map_with_path(draw, abstract)
  checkpoint.save_model(directory, params, dvae.model_config(model))
  return model, params


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A random tiny dVAE export, a tokenizer and a TFDS dir shared by every run here."""
  root = tmp_path_factory.mktemp("encode")
  model, params = save_tiny_dvae(root / "dvae")
  tokenizer_path = tokenizer_lib.train_tokenizer(tokenizer_lib.cupl_sentences()[:3000], root / "tok" / "spm", 256)
  return {"root": root, "model": model, "params": params, "tokenizer": tokenizer_path,
          "data_dir": str(root / "tfds")}


def make_config(setup, output, splits="validation,test", **overrides):
  config = encode_config.get_config("digits")
  config.data.image_size = IMAGE_SIZE
  config.data.global_batch = 16
  config.data.text_length = TEXT_LENGTH
  config.data.data_dir = setup["data_dir"]
  config.tokenizer.model_path = str(setup["tokenizer"])
  config.dvae_checkpoint = str(setup["root"] / "dvae")
  config.splits = splits
  config.output_dir = str(output)
  config.examples_per_shard = PER_SHARD
  config.update(overrides)
  return config


@pytest.fixture(scope="module")
def full_run(setup):
  output = setup["root"] / "tokens_full"
  dvae_encode.run(make_config(setup, output), str(setup["root"]))
  return output


def read_split(output, split, process_index=0, process_count=1):
  return [{k: (v.decode() if isinstance(v, bytes) else v.tolist()) for k, v in ex.items()}
          for ex in token_files.token_dataset(str(output), split, process_index, process_count).as_numpy_iterator()]


def shard_bytes(output):
  return {name: (output / name).read_bytes() for name in sorted(os.listdir(output)) if name.endswith(".tfrecord")}


def test_codes_are_the_models_argmax_codes_in_split_order(setup, full_run):
  config = make_config(setup, full_run)
  tokenizer = tokenizer_lib.Tokenizer(setup["tokenizer"])
  model, params = setup["model"], setup["params"]
  direct_codes = jax.jit(lambda images: model.apply({"params": params}, images, method=dvae.DVAE.encode_tokens))
  for split, size in SPLIT_SIZES.items():
    source = datasets.source_dataset(config.data, setup["data_dir"], split, 0, 1, preprocess.SkipCounter())
    images, captions = [], []
    for example in source.as_numpy_iterator():
      images.append(preprocess.map_pixels(preprocess.resize_and_crop(example["image"], IMAGE_SIZE), "dvae"))
      captions.append(example["caption"].decode())
    expected = np.asarray(direct_codes(np.stack(images))).reshape(size, GRID * GRID)

    records = read_split(full_run, split)
    assert len(records) == size
    np.testing.assert_array_equal(np.array([r["image_tokens"] for r in records]), expected)
    assert len(np.unique(expected)) > 3  # the model does not map everything to one code
    assert [r["caption"] for r in records] == captions
    np.testing.assert_array_equal(np.array([r["text_tokens"] for r in records]),
                                  tokenizer.tokenize(captions, "dalle", TEXT_LENGTH))

  metadata = token_files.read_metadata(full_run)
  assert (metadata["grid_height"], metadata["grid_width"], metadata["image_vocab_size"]) == (GRID, GRID, VOCAB)
  assert metadata["text_length"] == TEXT_LENGTH and metadata["text_vocab_size"] == 256
  assert metadata["dvae_model"] == dvae.model_config(model)
  assert metadata["tokenizer_path"] == str(setup["tokenizer"])
  for split, size in SPLIT_SIZES.items():
    assert metadata["splits"][split] == {"examples": size, "files": -(-size // PER_SHARD),
                                         "examples_per_process": [size], "skipped_examples": 0}
  assert not [name for name in os.listdir(full_run) if name.endswith(".tmp")]


def test_interrupted_runs_resume_to_identical_files(setup, full_run, tmp_path):
  output = tmp_path / "tokens"
  # Run 1 stops after 2 shards of validation; run 2 finishes validation and stops after 2 shards of test.
  dvae_encode.run(make_config(setup, output, max_shards_per_run=2), str(setup["root"]))
  assert sorted(shard_bytes(output)) == [f"validation-host00000-of-00001-shard0000{i}.tfrecord" for i in (0, 1)]
  assert token_files.read_metadata(output)["splits"] == {}
  with pytest.raises(DataError, match="not finished"):
    token_files.token_dataset(str(output), "validation", 0, 1)
  dvae_encode.run(make_config(setup, output, max_shards_per_run=2), str(setup["root"]))
  assert sorted(token_files.read_metadata(output)["splits"]) == ["validation"]
  assert len(token_files.host_shards(output, "test", 0, 1)) == 2
  # A crash mid-shard leaves a temporary file, or a short shard without a done marker: both redone.
  (output / "test-host00000-of-00001-shard00002.tfrecord.tmp").write_bytes(b"half a shard")
  last = "test-host00000-of-00001-shard00001.tfrecord"
  with tf.io.TFRecordWriter(str(output / last)) as writer:
    for record in tf.data.TFRecordDataset(str(full_run / last)).take(5).as_numpy_iterator():
      writer.write(record)
  assert not (output / "test-host00000-of-00001.done.json").exists()
  validation_times = {n: os.stat(output / n).st_mtime_ns for n in shard_bytes(output) if n.startswith("validation")}

  dvae_encode.run(make_config(setup, output), str(setup["root"]))
  assert shard_bytes(output) == shard_bytes(full_run)
  full_metadata, resumed_metadata = token_files.read_metadata(full_run), token_files.read_metadata(output)
  assert resumed_metadata["splits"] == full_metadata["splits"]
  assert {n: os.stat(output / n).st_mtime_ns for n in validation_times} == validation_times  # not redone
  assert not [name for name in os.listdir(output) if name.endswith(".tmp")]


def test_folder_images_that_do_not_decode_are_counted_and_resume_skips_written_examples(setup, tmp_path):
  folder = tmp_path / "images"
  folder.mkdir()
  rng = np.random.default_rng(0)
  broken = (2, 5)
  for i in range(20):
    if i in broken:
      (folder / f"img_{i:02d}.png").write_bytes(b"not a png")
    else:
      Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(folder / f"img_{i:02d}.png")
    (folder / f"img_{i:02d}.txt").write_text(f"picture number {i}")
  output = tmp_path / "tokens"
  config = make_config(setup, output, splits="train", examples_per_shard=8, max_shards_per_run=1,
                       data=dict(name="folder", path=str(folder), global_batch=8))
  dvae_encode.run(config, str(setup["root"]))
  assert len(token_files.host_shards(output, "train", 0, 1)) == 1
  config.max_shards_per_run = 0
  dvae_encode.run(config, str(setup["root"]))
  # The resumed run skips the 8 examples written, not 8 files: the two broken ones came before.
  assert [r["caption"] for r in read_split(output, "train")] == [
      f"picture number {i}" for i in range(20) if i not in broken]
  assert token_files.read_metadata(output)["splits"]["train"] == {
      "examples": 18, "files": 3, "examples_per_process": [18], "skipped_examples": 2}


def test_other_settings_are_refused_and_bad_config_named(setup, full_run):
  with pytest.raises(DataError, match=r"other settings \(text_length: 16 then, 12 now\)"):
    dvae_encode.run(make_config(setup, full_run, data=dict(text_length=12)), str(setup["root"]))
  with pytest.raises(ConfigError, match="config.examples_per_shard=20"):
    dvae_encode.run(make_config(setup, full_run, examples_per_shard=20), str(setup["root"]))
  with pytest.raises(ConfigError, match="config.data.image_size=30"):
    dvae_encode.run(make_config(setup, full_run, data=dict(image_size=30)), str(setup["root"]))
  with pytest.raises(DataError, match="does not exist"):
    dvae_encode.run(make_config(setup, full_run, dvae_checkpoint=str(setup["root"] / "none")),
                    str(setup["root"]))


def test_hosts_read_the_split_once_with_padded_batches(setup):
  """The reading side of two hosts: parts of 90 and 89 in order, both 12 batches once padded."""
  config = make_config(setup, setup["root"] / "unused")
  tokenizer = tokenizer_lib.Tokenizer(setup["tokenizer"])

  def captions(process_index, process_count, skip=0, local_batch=8):
    batches = list(dvae_encode.host_batches(config, setup["data_dir"], "validation", tokenizer, IMAGE_SIZE,
                                            local_batch, skip, process_index, process_count,
                                            preprocess.SkipCounter()))
    for batch in batches:
      image, valid = dvae_encode.pad_batch(batch, local_batch, IMAGE_SIZE)
      assert image.shape == (local_batch, IMAGE_SIZE, IMAGE_SIZE, 3) and valid.sum() == len(batch["image"])
      np.testing.assert_array_equal(image[valid], batch["image"])
      assert not image[~valid].any()
    return len(batches), [c.decode() for batch in batches for c in batch["caption"]]

  (batches_0, part_0), (batches_1, part_1) = captions(0, 2), captions(1, 2)
  _, whole = captions(0, 1)
  assert (len(part_0), len(part_1), batches_0, batches_1) == (90, 89, 12, 12)
  assert part_0 + part_1 == whole and len(whole) == SPLIT_SIZES["validation"]
  assert captions(1, 2, skip=64)[1] == part_1[64:]  # a resumed host starts after its finished shards


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow  # two processes each import jax + tf and compile: ~15 s on an idle 2-core machine
def test_two_processes_encode_each_example_once(setup, full_run, tmp_path):
  """Two real jax.distributed CPU processes (4 devices each) through `python -m mmjax.main`."""
  output = tmp_path / "tokens"
  config = make_config(setup, output, splits="validation")
  overrides = [f"--config.{key}={value}" for key, value in (
      ("data.image_size", IMAGE_SIZE), ("data.global_batch", 16), ("data.text_length", TEXT_LENGTH),
      ("data.data_dir", config.data.data_dir), ("tokenizer.model_path", config.tokenizer.model_path),
      ("dvae_checkpoint", config.dvae_checkpoint), ("splits", "validation"), ("output_dir", output),
      ("examples_per_shard", PER_SHARD))]
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  procs = [subprocess.Popen(
      [sys.executable, "-m", "mmjax.main", "--config=mmjax/configs/dvae_encode.py:digits",
       f"--workdir={tmp_path}", "--distributed=on", f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", f"--process_id={i}", *overrides],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    for proc in procs:
      _, err = proc.communicate(timeout=240)
      assert proc.returncode == 0, err[-3000:]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()

  split = token_files.read_metadata(output)["splits"]["validation"]
  assert split["examples_per_process"] == [90, 89] and split["examples"] == 179 and split["files"] == 4
  # Read back in file order, the two hosts' parts are the split in order, as one process wrote it.
  assert read_split(output, "validation") == read_split(full_run, "validation")
  parts = [read_split(output, "validation", p, 2) for p in range(2)]
  union = collections.Counter(tuple(r["image_tokens"]) + (r["caption"],) for part in parts for r in part)
  assert sum(union.values()) == 179
  assert union == collections.Counter(tuple(r["image_tokens"]) + (r["caption"],)
                                      for r in read_split(full_run, "validation"))
