"""Users' folders (sidecar captions, CSV, JSONL) and img2dataset-style TFRecords, with bad files."""

import csv
import io
import json
import os
import shutil

import numpy as np
from PIL import Image
import pytest
import sklearn.datasets
import tensorflow as tf

from mmjax.errors import DataError
from mmjax.input_pipeline.preprocess import SkipCounter
from mmjax.input_pipeline.user_data import folder_dataset, tfrecord_dataset

SAMPLE_IMAGES = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
GRAY = np.arange(20, dtype=np.uint8).reshape(4, 5) * 12
RGBA = np.dstack([np.full((3, 4, 3), (200, 100, 50), np.uint8), np.array(
    [[0, 64, 128, 255]] * 3, np.uint8)])


def png_bytes(pixels: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, "PNG")
  return buffer.getvalue()


def china_bytes() -> bytes:
  with open(os.path.join(SAMPLE_IMAGES, "china.jpg"), "rb") as f:
    return f.read()


def good_and_bad_images() -> dict[str, bytes]:
  """File name -> bytes: 4 decodable images (real photos, grey, RGBA) and 3 corrupt ones."""
  images = {"gray.png": png_bytes(GRAY), "rgba.png": png_bytes(RGBA)}
  for name in ("china.jpg", "flower.jpg"):
    with open(os.path.join(SAMPLE_IMAGES, name), "rb") as f:
      images[f"photos/{name}"] = f.read()
  images["truncated.jpg"] = china_bytes()[:5000]
  images["noise.jpg"] = np.random.default_rng(0).bytes(3000)
  images["notes.jpg"] = b"shopping list: milk, eggs\n"
  return images


def write_files(root, files: dict[str, bytes | str]) -> None:
  for name, content in files.items():
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(content.encode() if isinstance(content, str) else content)


def read_all(dataset) -> dict[str, np.ndarray]:
  examples = {}
  for example in dataset.as_numpy_iterator():
    assert example["image"].ndim == 3 and example["image"].shape[2] == 3
    examples[example["caption"].decode()] = example["image"]
  return examples


def check_good_images(examples, caption_of):
  """The decodable images arrived under their own captions with the right pixels."""
  assert sorted(examples) == sorted(caption_of[n] for n in ("gray.png", "rgba.png",
                                                           "photos/china.jpg", "photos/flower.jpg"))
  np.testing.assert_array_equal(examples[caption_of["gray.png"]], np.dstack([GRAY] * 3))
  np.testing.assert_array_equal(examples[caption_of["rgba.png"]], RGBA[:, :, :3])  # alpha dropped
  assert examples[caption_of["photos/china.jpg"]].shape == (427, 640, 3)


# ----------------------------------------------------------------------------- sidecar captions

def test_sidecar_folder_keeps_good_and_counts_each_bad_example(tmp_path):
  images = good_and_bad_images()
  images["blank_caption.png"] = png_bytes(GRAY)
  images["no_caption.png"] = png_bytes(GRAY)
  caption_of = {name: f"caption of {name}" for name in images}
  captions = {os.path.splitext(n)[0] + ".txt": c for n, c in caption_of.items()}
  captions["blank_caption.txt"] = "  \n\t "
  del captions["no_caption.txt"]
  captions["gray.txt"] = "  a  grey\ngradient \n"  # whitespace runs become one space
  caption_of["gray.png"] = "a grey gradient"
  write_files(tmp_path, {**images, **captions})

  counter = SkipCounter()
  examples = read_all(folder_dataset(str(tmp_path), 0, 1, counter))
  check_good_images(examples, caption_of)
  assert counter.counts() == {"missing_caption": 1, "empty_caption": 1, "undecodable_image": 3}


def test_hosts_read_disjoint_parts_that_cover_the_folder(tmp_path):
  files = {}
  for i in range(7):
    files[f"{i}.png"] = png_bytes(np.full((2, 2, 3), i, np.uint8))
    files[f"{i}.txt"] = f"image {i}"
  write_files(tmp_path, files)
  parts = []
  for process_index in range(3):
    counter = SkipCounter()
    parts.append(set(read_all(folder_dataset(str(tmp_path), process_index, 3, counter))))
    assert counter.total() == 0
  assert sum(len(part) for part in parts) == 7
  assert set.union(*parts) == {f"image {i}" for i in range(7)}
  assert [len(part) for part in parts] == [3, 2, 2]
  with pytest.raises(DataError, match="7 examples, fewer than the 8 hosts"):
    folder_dataset(str(tmp_path), 0, 8, SkipCounter())


# ----------------------------------------------------------------------------- index files

def test_csv_index_with_aliased_columns(tmp_path):
  images = good_and_bad_images()
  write_files(tmp_path / "data", images)
  caption_of = {name: f"a picture called {name}, with a comma" for name in images}
  rows = [{"image": name, "text": caption} for name, caption in caption_of.items()]
  rows.append({"image": "gone.jpg", "text": "listed but not there"})
  rows.append({"image": "gray.png", "text": ""})
  with open(tmp_path / "data" / "index.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=["image", "text"])
    writer.writeheader()
    writer.writerows(rows)

  counter = SkipCounter()
  examples = read_all(folder_dataset(str(tmp_path / "data"), 0, 1, counter))
  check_good_images(examples, caption_of)
  assert counter.counts() == {"missing_image_file": 1, "empty_caption": 1, "undecodable_image": 3}
  # pointing at the index file itself reads the same
  same = read_all(folder_dataset(str(tmp_path / "data" / "index.csv"), 0, 1, SkipCounter()))
  assert sorted(same) == sorted(examples)


def test_jsonl_index_with_text_key(tmp_path):
  images = good_and_bad_images()
  write_files(tmp_path, images)
  caption_of = {name: f"jsonl caption {i}" for i, name in enumerate(images)}
  lines = [json.dumps({"file_name": name, "text": caption}) for name, caption in caption_of.items()]
  lines.append(json.dumps({"file_name": "gray.png"}))  # no caption at all: counted as empty
  write_files(tmp_path, {"metadata.jsonl": "\n".join(lines) + "\n"})
  counter = SkipCounter()
  check_good_images(read_all(folder_dataset(str(tmp_path), 0, 1, counter)), caption_of)
  assert counter.counts() == {"missing_image_file": 0, "empty_caption": 1, "undecodable_image": 3}


def test_index_errors_name_the_file_and_what_was_found(tmp_path):
  write_files(tmp_path, {"a.png": png_bytes(GRAY), "index.csv": "path,label\na.png,cat\n"})
  with pytest.raises(DataError, match=r"index\.csv: no file-name column; expected one of "
                     r"file_name, image, filepath, found path, label"):
    folder_dataset(str(tmp_path), 0, 1, SkipCounter())
  write_files(tmp_path, {"index.csv": "file_name,label\na.png,cat\n"})
  with pytest.raises(DataError, match=r"no caption column; expected one of caption, text, "
                     r"found file_name, label"):
    folder_dataset(str(tmp_path), 0, 1, SkipCounter())
  write_files(tmp_path, {"other.jsonl": '{"file_name": "a.png", "caption": "x"}\n'})
  with pytest.raises(DataError, match="several index files"):
    folder_dataset(str(tmp_path), 0, 1, SkipCounter())
  os.remove(tmp_path / "index.csv")
  write_files(tmp_path, {"other.jsonl": '{"file_name": "a.png", "caption": "x"}\nnot json\n'})
  with pytest.raises(DataError, match=r"other\.jsonl line 2 is not JSON"):
    folder_dataset(str(tmp_path), 0, 1, SkipCounter())


# ----------------------------------------------------------------------------- folder errors

def test_folder_errors(tmp_path):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(DataError, match=f"{missing}.*does not exist"):
    folder_dataset(missing, 0, 1, SkipCounter())
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(DataError, match=f"{empty} holds no images"):
    folder_dataset(str(empty), 0, 1, SkipCounter())
  write_files(empty, {"a.png": png_bytes(GRAY), "b.jpg": china_bytes()})
  with pytest.raises(DataError, match=f"{empty} holds 2 images but no captions.*cat.txt"):
    folder_dataset(str(empty), 0, 1, SkipCounter())


# ----------------------------------------------------------------------------- TFRecords

def write_tfrecords(path_prefix, examples, num_files, image_key="jpg", caption_key="txt"):
  """img2dataset's layout: bytes features `jpg`/`png`/`webp`, `txt`, `key`."""
  paths = [f"{path_prefix}-{i:05d}.tfrecord" for i in range(num_files)]
  writers = [tf.io.TFRecordWriter(p) for p in paths]
  for i, (image_bytes, caption) in enumerate(examples):
    feature = {image_key: image_bytes, caption_key: caption.encode(), "key": f"{i:09d}".encode()}
    example = tf.train.Example(features=tf.train.Features(feature={
        k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v])) for k, v in feature.items()}))
    writers[i % num_files].write(example.SerializeToString())
  for writer in writers:
    writer.close()
  return paths


def test_tfrecords_decode_and_count_bad_records(tmp_path):
  images = good_and_bad_images()
  caption_of = {name: f"record {name}" for name in images}
  examples = [(content, caption_of[name]) for name, content in images.items()]
  examples.append((png_bytes(GRAY), " "))
  write_tfrecords(tmp_path / "shard", examples, num_files=3)
  counter = SkipCounter()
  check_good_images(read_all(tfrecord_dataset(str(tmp_path / "shard-*"), 0, 1, counter)),
                    caption_of)
  assert counter.counts() == {"empty_caption": 1, "undecodable_image": 3}


def test_undecoded_sources_give_the_stored_bytes_and_drop_only_empty_captions(tmp_path):
  images = good_and_bad_images()
  caption_of = {name: f"caption of {name}" for name in images}
  captions = {os.path.splitext(n)[0] + ".txt": c for n, c in caption_of.items()}
  captions["gray.txt"] = " \n "
  write_files(tmp_path / "folder", {**images, **captions})
  write_tfrecords(tmp_path / "shard", [(images[n], captions[os.path.splitext(n)[0] + ".txt"])
                                       for n in images], num_files=2)
  for read in (lambda c: folder_dataset(str(tmp_path / "folder"), 0, 1, c, decode=False),
               lambda c: tfrecord_dataset(str(tmp_path / "shard-*"), 0, 1, c, decode=False)):
    counter = SkipCounter()
    dataset = read(counter)
    assert dataset.element_spec["image"].dtype == tf.string
    examples = {ex["caption"].decode(): ex["image"] for ex in dataset.as_numpy_iterator()}
    # every image but the blank-captioned one, decodable or not, as the exact bytes stored
    assert examples == {caption_of[n]: images[n] for n in images if n != "gray.png"}
    assert {reason: n for reason, n in counter.counts().items() if n} == {"empty_caption": 1}


def test_tfrecord_file_order_is_shuffled_by_the_seed_each_pass(tmp_path):
  examples = [(png_bytes(np.full((2, 2, 3), i, np.uint8)), f"record {i}") for i in range(16)]
  write_tfrecords(tmp_path / "part", examples, num_files=8)  # file f holds records f and f + 8

  def passes(seed, count=2):
    dataset = tfrecord_dataset(str(tmp_path / "part-*"), 0, 1, SkipCounter(), decode=False,
                               seed=seed).map(lambda ex: ex["caption"]).repeat(count)
    captions = [c.decode() for c in dataset.as_numpy_iterator()]
    return captions[:16], captions[16:]

  first, second = passes(seed=3)
  assert sorted(first) == sorted(second) == sorted(caption for _, caption in examples)
  assert first != second  # a new file order on each pass
  assert passes(seed=3) == (first, second)
  assert passes(seed=4)[0] != first
  unshuffled, again = passes(seed=None)
  assert unshuffled == again != first


@pytest.mark.parametrize("num_files,num_hosts", [(4, 2), (2, 3)])  # by file, then by record
def test_tfrecord_hosts_read_disjoint_parts(tmp_path, num_files, num_hosts):
  examples = [(png_bytes(np.full((2, 3, 3), i, np.uint8)), f"pixel value {i}") for i in range(10)]
  write_tfrecords(tmp_path / "part", examples, num_files, image_key="png")
  parts = [set(read_all(tfrecord_dataset(str(tmp_path / "part-*"), i, num_hosts, SkipCounter())))
           for i in range(num_hosts)]
  assert sum(len(part) for part in parts) == 10
  assert set.union(*parts) == {f"pixel value {i}" for i in range(10)}
  assert min(len(part) for part in parts) >= 3


def test_tfrecord_errors_name_the_pattern_and_keys_found(tmp_path):
  pattern = str(tmp_path / "missing-*.tfrecord")
  with pytest.raises(DataError, match="missing-.*matches no files"):
    tfrecord_dataset(pattern, 0, 1, SkipCounter())
  write_tfrecords(tmp_path / "odd", [(png_bytes(GRAY), "x")], 1, image_key="image_bytes",
                  caption_key="label")
  with pytest.raises(DataError, match=r"no image feature; expected one of jpg, png, webp, jpeg, "
                     r"found image_bytes, key, label"):
    tfrecord_dataset(str(tmp_path / "odd-*"), 0, 1, SkipCounter())
  shutil.rmtree(tmp_path)
  os.makedirs(tmp_path)
  write_tfrecords(tmp_path / "empty", [], 2)
  with pytest.raises(DataError, match="hold no records"):
    tfrecord_dataset(str(tmp_path / "empty-*"), 0, 1, SkipCounter())
