r"""Input-pipeline throughput on this CPU: images/s (and per core) through mmjax's per-host tf.data.

  .venv/bin/python bench/input_pipeline.py
  .venv/bin/python bench/input_pipeline.py --num_jpegs=4000 --seconds=30

Cases, each the full training pipeline (create_dataset(train=True) read through DataIterator):
  tokenize   sentencepiece alone: CuPL captions -> int32 rows, in numpy and inside tf.data
  shapes     the embedded shapes set at 64 px (PNG decode, crop, dvae pixels, dalle text layout)
  jpeg       img2dataset-style TFRecords of 256×256 JPEGs (real photo crops from scikit-learn's
             sample images) with CuPL captions: decode, random crop, resize, pixels, tokenization
The tokenizer is trained first on the CuPL captions (--vocab_size). Each pipeline is warmed up
(shuffle buffer filled) before timing; then the iterator checkpoint it writes, with its prefetch
buffer full, is measured too. Other processes on the machine slow every number down: run it idle.
Prints a markdown table and writes bench/results/input_pipeline.json.
"""

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from mmjax.configs import common  # noqa: E402
from mmjax.input_pipeline import pipeline  # noqa: E402
from mmjax.input_pipeline import tokenizer as tokenizer_lib  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "input_pipeline.json"

_SECONDS = flags.DEFINE_float("seconds", 15.0, "Timed seconds per pipeline case (after warm-up).")
_NUM_SHAPES = flags.DEFINE_integer("num_shapes", 10_000, "Examples in the shapes train split.")
_NUM_JPEGS = flags.DEFINE_integer("num_jpegs", 3000, "256×256 JPEGs to write for the jpeg case.")
_SHARDS = flags.DEFINE_integer("shards", 4, "TFRecord files the JPEGs are spread over.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 16384, "Tokenizer pieces (16,384 as in DALL·E).")
_TEXT_LENGTH = flags.DEFINE_integer("text_length", 256, "Text positions per caption (dalle layout).")
_OUTPUT = flags.DEFINE_string("output", str(RESULTS), "Where to write the JSON results.")


def cores():
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def bench_tokenize(tokenizer, captions):
  """captions/s: one numpy call on 65k captions, and tf.data batches of 256 through tf_tokenize."""
  array = np.array([c.encode() for c in captions[:65536]], dtype=object)
  start, cpu_start = time.perf_counter(), time.process_time()
  tokenizer.tokenize(array, "dalle", _TEXT_LENGTH.value)
  numpy_rates = (len(array) / (time.perf_counter() - start), len(array) / (time.process_time() - cpu_start))
  dataset = tf.data.Dataset.from_tensor_slices(array).batch(256).map(
      lambda batch: tokenizer.tf_tokenize(batch, "dalle", _TEXT_LENGTH.value)).prefetch(2)
  start, cpu_start, count = time.perf_counter(), time.process_time(), 0
  for batch in dataset:
    count += int(batch.shape[0])
  return numpy_rates, (count / (time.perf_counter() - start), count / (time.process_time() - cpu_start))


def write_jpeg_tfrecords(directory, captions, num_images, shards, seed=0):
  """img2dataset-like shards: square crops of real photos, flipped/jittered, 256×256 JPEG q=90."""
  from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
  photos = load_sample_images().images  # two 427×640 photographs
  rng = np.random.default_rng(seed)
  writers = [tf.io.TFRecordWriter(os.path.join(directory, f"{i:05d}.tfrecord")) for i in range(shards)]
  for i in range(num_images):
    photo = photos[i % len(photos)]
    side = int(rng.integers(160, 427))
    top, left = int(rng.integers(0, 427 - side + 1)), int(rng.integers(0, 640 - side + 1))
    crop = tf.image.resize(photo[top:top + side, left:left + side], [256, 256], antialias=True)
    crop = tf.clip_by_value(crop * rng.uniform(0.7, 1.3), 0, 255)
    crop = tf.cast(crop[:, ::-1] if rng.random() < 0.5 else crop, tf.uint8)
    features = {"jpg": tf.io.encode_jpeg(crop, quality=90).numpy(),
                "txt": captions[int(rng.integers(len(captions)))].encode(), "key": f"{i:09d}".encode()}
    example = tf.train.Example(features=tf.train.Features(feature={
        k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v])) for k, v in features.items()}))
    writers[i % shards].write(example.SerializeToString())
  for writer in writers:
    writer.close()


def bench_pipeline(config, data_dir, tokenizer, checkpoint_dir):
  """images/s of create_dataset(train=True) after warm-up (wall clock, and per CPU-second this
  process used), and the size of its iterator checkpoint in bytes."""
  dataset = pipeline.create_dataset(config, data_dir, tokenizer, train=True, process_index=0, process_count=1)
  iterator = pipeline.DataIterator(dataset, 0)
  batch = config.data.global_batch
  warmup = max(5, 2 * config.data.shuffle_buffer // batch)  # fills the shuffle buffer
  for _ in range(warmup):
    next(iterator)
  start, cpu_start, images = time.perf_counter(), time.process_time(), 0
  while time.perf_counter() - start < _SECONDS.value:
    images += len(next(iterator)["caption"])
  rate = images / (time.perf_counter() - start)
  cpu_rate = images / (time.process_time() - cpu_start)  # per CPU-second of this process, all threads
  time.sleep(2.0)  # let the prefetch buffer fill, as it is when an accelerator is the bottleneck
  iterator.save(checkpoint_dir)
  size = sum(f.stat().st_size for f in pathlib.Path(checkpoint_dir).rglob("*") if f.is_file())
  return rate, cpu_rate, size


def main(argv):
  del argv
  work = tempfile.mkdtemp(prefix="mmjax_bench_input_")
  try:
    captions = tokenizer_lib.cupl_sentences()
    tokenizer = tokenizer_lib.Tokenizer(
        tokenizer_lib.train_tokenizer(captions, os.path.join(work, "spm"), _VOCAB_SIZE.value))
    (numpy_rate, numpy_cpu_rate), (tf_rate, tf_cpu_rate) = bench_tokenize(tokenizer, captions)
    rows = [{"case": "tokenize (numpy, one call)", "image_size": None, "batch": 65536,
             "captions_per_s": numpy_rate, "captions_per_cpu_s": numpy_cpu_rate},
            {"case": "tokenize (tf.data, batches of 256)", "image_size": None, "batch": 256,
             "captions_per_s": tf_rate, "captions_per_cpu_s": tf_cpu_rate}]

    config = common.base_config()
    config.data = common.data_config(name="shapes", image_size=64, global_batch=256,
                                     text_length=_TEXT_LENGTH.value)
    config.data.num_examples = _NUM_SHAPES.value
    rate, cpu_rate, size = bench_pipeline(config, os.path.join(work, "tfds"), tokenizer,
                                          os.path.join(work, "ck_shapes"))
    rows.append({"case": "shapes 64 px (TFDS PNG)", "image_size": 64, "batch": 256, "images_per_s": rate,
                 "images_per_cpu_s": cpu_rate, "checkpoint_bytes": size})

    records = os.path.join(work, "jpeg")
    os.makedirs(records)
    write_jpeg_tfrecords(records, captions, _NUM_JPEGS.value, _SHARDS.value)
    config.data = common.data_config(name="tfrecord", image_size=256, global_batch=64,
                                     text_length=_TEXT_LENGTH.value)
    config.data.update(path=os.path.join(records, "*.tfrecord"), random_crop=True)
    rate, cpu_rate, size = bench_pipeline(config, "", tokenizer, os.path.join(work, "ck_jpeg"))
    rows.append({"case": "jpeg 256 px (TFRecord jpg/txt)", "image_size": 256, "batch": 64,
                 "images_per_s": rate, "images_per_cpu_s": cpu_rate, "checkpoint_bytes": size})
  finally:
    shutil.rmtree(work, ignore_errors=True)

  n = cores()
  command = "python bench/input_pipeline.py " + " ".join(
      f"--{f.name}={f.value}" for f in (_SECONDS, _NUM_SHAPES, _NUM_JPEGS, _SHARDS, _VOCAB_SIZE, _TEXT_LENGTH))
  print(f"\nInput pipeline on {n} CPU cores ({platform.processor() or platform.machine()}), "
        f"TF {tf.__version__}, vocab {_VOCAB_SIZE.value}, text_length {_TEXT_LENGTH.value}\n")
  print(f"Load average at the end: {os.getloadavg()[0]:.1f} (other processes slow the wall-clock columns)\n")
  print("| case | batch | images/s | images/s per core | images per CPU-second "
        "| captions/s (per CPU-second) | iterator checkpoint |")
  print("|---|---|---|---|---|---|---|")
  for row in rows:
    if "images_per_s" in row:
      row["images_per_s_per_core"] = row["images_per_s"] / n
      print(f"| {row['case']} | {row['batch']} | {row['images_per_s']:,.0f} "
            f"| {row['images_per_s_per_core']:,.0f} | {row['images_per_cpu_s']:,.0f} "
            f"| | {row['checkpoint_bytes'] / 1e6:,.1f} MB |")
    else:
      print(f"| {row['case']} | {row['batch']} | | | "
            f"| {row['captions_per_s']:,.0f} ({row['captions_per_cpu_s']:,.0f}) | |")
  print(f"\nReproduce: `{command}`")
  output = pathlib.Path(_OUTPUT.value)
  output.parent.mkdir(parents=True, exist_ok=True)
  output.write_text(json.dumps({"command": command, "cores": n, "tensorflow": tf.__version__,
                                "load_average": os.getloadavg()[0],
                                "machine": platform.machine(), "rows": rows}, indent=1))
  print(f"Wrote {output}")


if __name__ == "__main__":
  app.run(main)
