"""Users' own image–caption data as `tf.data.Dataset`s of {"image": uint8 [H,W,3], "caption": str}.

Two sources:

* `folder_dataset(path, ...)`: a folder of images (.jpg .jpeg .png .gif .bmp .webp, searched
  recursively) whose captions come from an index — `path` itself if it is a .csv / .jsonl file, else
  a single .csv / .jsonl at the folder's top level — or, without one, from sidecar text files
  (`cat.jpg` + `cat.txt`). CSV columns: `file_name` (or `image`, `filepath`) and `caption` (or
  `text`); JSONL lines: {"file_name": ..., "caption": ...} with the same aliases. File names are
  relative to the index's folder.
* `tfrecord_dataset(pattern, ...)`: TFRecord shards of tf.train.Example as img2dataset writes them,
  encoded image under `jpg` (or `png`, `webp`, `jpeg`) and caption under `txt` (or `caption`).

Each host (`process_index` of `process_count`) reads a disjoint part: the file list or index is
sharded before anything is read; with fewer TFRecord files than hosts, records are sharded instead.
Images that cannot be decoded and captions that are empty after whitespace cleanup are dropped and
counted in the `SkipCounter`; so are listed images that do not exist and images without a caption
file (counted once, when the dataset is built). Captions keep their case; runs of whitespace become
one space.

`decode=False` yields the encoded file bytes instead (a tf.string "image"; empty captions are still
dropped): a training pipeline shuffles those, a few KB each rather than a decoded image, and decodes
after its shuffle buffer with `preprocess.try_decode_image`, counting what fails there. With a
`seed`, `tfrecord_dataset` reads its files in an order shuffled by that seed, anew on each pass.
"""

import csv
import json
import os

import tensorflow as tf

from mmjax.errors import DataError
from mmjax.input_pipeline.preprocess import SkipCounter, try_decode_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
INDEX_EXTENSIONS = (".csv", ".jsonl")
FILE_NAME_KEYS = ("file_name", "image", "filepath")
CAPTION_KEYS = ("caption", "text")
TFRECORD_IMAGE_KEYS = ("jpg", "png", "webp", "jpeg")
TFRECORD_CAPTION_KEYS = ("txt", "caption")
_AUTOTUNE = tf.data.AUTOTUNE


# ----------------------------------------------------------------------------- public

def folder_dataset(path: str, process_index: int, process_count: int, counter: SkipCounter,
                   decode: bool = True) -> tf.data.Dataset:
  """Images + captions from a folder (index file or sidecar .txt files); this host's part only.

  decode=False: "image" holds the file's bytes, undecoded (see the module docstring).
  """
  _check_process(process_index, process_count)
  if not tf.io.gfile.exists(path):
    raise DataError(f"config.data.path = {path!r} does not exist; expected a folder of images "
                    "with captions, or a .csv / .jsonl index.")
  if tf.io.gfile.isdir(path):
    root, index_path = path, _find_index(path)
  elif path.lower().endswith(INDEX_EXTENSIONS):
    root, index_path = os.path.dirname(path) or ".", path
  else:
    raise DataError(f"config.data.path = {path!r} is a file but not a .csv / .jsonl index.")
  present = _list_files(root)
  if index_path:
    image_paths, captions = _index_examples(index_path, root)
    image_paths, captions = _shard_lists(path, process_index, process_count, image_paths, captions)
    found = [image_path in present or tf.io.gfile.exists(image_path) for image_path in image_paths]
    counter.add("missing_image_file", found.count(False))
    examples = {"image_path": [p for p, ok in zip(image_paths, found) if ok],
                "caption": [c for c, ok in zip(captions, found) if ok]}
    dataset = tf.data.Dataset.from_tensor_slices(examples)
  else:
    image_paths, caption_paths = _sidecar_examples(path, present)
    image_paths, caption_paths = _shard_lists(
        path, process_index, process_count, image_paths, caption_paths)
    captioned = [caption_path is not None for caption_path in caption_paths]
    counter.add("missing_caption", captioned.count(False))
    examples = {"image_path": [p for p, ok in zip(image_paths, captioned) if ok],
                "caption_path": [c for c in caption_paths if c is not None]}
    dataset = tf.data.Dataset.from_tensor_slices(examples).map(
        lambda ex: {"image_path": ex["image_path"], "caption": tf.io.read_file(ex["caption_path"])},
        num_parallel_calls=_AUTOTUNE)
  dataset = dataset.map(
      lambda ex: {"image_bytes": tf.io.read_file(ex["image_path"]), "caption": ex["caption"]},
      num_parallel_calls=_AUTOTUNE)
  return _drop_bad(dataset, counter, decode)


def tfrecord_dataset(pattern: str, process_index: int, process_count: int, counter: SkipCounter,
                     decode: bool = True, seed: int | None = None) -> tf.data.Dataset:
  """Images + captions from img2dataset-style TFRecord shards matching `pattern`; this host's.

  decode=False: "image" holds the stored bytes, undecoded. seed: shuffles the order this host
  reads its files in, differently on each pass (None: sorted order). With fewer files than hosts,
  every host reads all files and keeps every n-th record; that partition needs the same file order
  on every host, so the order then stays sorted whatever the (per-host) seed.
  """
  _check_process(process_index, process_count)
  files = sorted(tf.io.gfile.glob(pattern))
  if not files:
    raise DataError(f"config.data.path = {pattern!r} matches no files; expected TFRecord shards.")
  image_key, caption_key = _tfrecord_keys(files)
  if len(files) >= process_count:
    own_files = files[process_index::process_count]
    host_files = tf.data.Dataset.from_tensor_slices(own_files)
    if seed is not None:  # a buffer of every file name: a uniform permutation per pass
      host_files = host_files.shuffle(len(own_files), seed=seed, reshuffle_each_iteration=True)
    records = tf.data.TFRecordDataset(host_files, num_parallel_reads=_AUTOTUNE)
  else:  # too few files to give every host one: every host reads all, keeps every n-th record
    records = tf.data.TFRecordDataset(files).shard(process_count, process_index)
  features = {image_key: tf.io.FixedLenFeature([], tf.string, default_value=""),
              caption_key: tf.io.FixedLenFeature([], tf.string, default_value="")}

  def parse(record):
    example = tf.io.parse_single_example(record, features)
    return {"image_bytes": example[image_key], "caption": example[caption_key]}

  return _drop_bad(records.map(parse, num_parallel_calls=_AUTOTUNE), counter, decode)


# ----------------------------------------------------------------------------- decoding and drops

def _drop_bad(dataset: tf.data.Dataset, counter: SkipCounter, decode: bool) -> tf.data.Dataset:
  """{"image_bytes", "caption"} -> {"image", "caption"}, dropping and counting empty captions and,
  when decoding, undecodable images; `decode=False` leaves "image" as the encoded bytes."""
  dataset = dataset.map(
      lambda ex: {**ex, "caption": tf.strings.strip(
          tf.strings.regex_replace(ex["caption"], r"\s+", " "))})
  dataset = counter.drop_unless(
      dataset, lambda ex: tf.strings.length(ex["caption"]) > 0, "empty_caption")
  if not decode:
    return dataset.map(lambda ex: {"image": ex["image_bytes"], "caption": ex["caption"]})

  def decode_example(ex):
    image, ok = try_decode_image(ex["image_bytes"])
    return {"image": image, "caption": ex["caption"], "decoded": ok}

  dataset = dataset.map(decode_example, num_parallel_calls=_AUTOTUNE)
  dataset = counter.drop_unless(dataset, lambda ex: ex["decoded"], "undecodable_image")
  return dataset.map(lambda ex: {"image": ex["image"], "caption": ex["caption"]})


# ----------------------------------------------------------------------------- folders

def _list_files(root: str) -> set[str]:
  return {os.path.normpath(os.path.join(folder, name))
          for folder, _, names in tf.io.gfile.walk(root) for name in names}


def _find_index(folder: str) -> str | None:
  indexes = sorted(name for name in tf.io.gfile.listdir(folder)
                   if name.lower().endswith(INDEX_EXTENSIONS))
  if len(indexes) > 1:
    raise DataError(f"{folder} holds several index files ({', '.join(indexes)}); set "
                    "config.data.path to the one to use.")
  return os.path.join(folder, indexes[0]) if indexes else None


def _sidecar_examples(path: str, present: set[str]) -> tuple[list[str], list[str | None]]:
  """Sorted image paths and each one's caption file (None where there is none)."""
  image_paths = sorted(p for p in present if p.lower().endswith(IMAGE_EXTENSIONS))
  if not image_paths:
    raise DataError(f"{path} holds no images ({' '.join(IMAGE_EXTENSIONS)}) and no .csv / .jsonl "
                    "index; expected images with captions.")
  caption_paths = [os.path.splitext(p)[0] + ".txt" for p in image_paths]
  caption_paths = [p if p in present else None for p in caption_paths]
  if not any(caption_paths):
    raise DataError(f"{path} holds {len(image_paths)} images but no captions; expected a sidecar "
                    "text file per image (cat.jpg + cat.txt) or a .csv / .jsonl index with "
                    f"columns {FILE_NAME_KEYS[0]},{CAPTION_KEYS[0]}.")
  return image_paths, caption_paths


def _index_examples(index_path: str, root: str) -> tuple[list[str], list[str]]:
  rows = _read_csv(index_path) if index_path.lower().endswith(".csv") else _read_jsonl(index_path)
  if not rows:
    raise DataError(f"{index_path} lists no images; expected rows of "
                    f"{FILE_NAME_KEYS[0]},{CAPTION_KEYS[0]}.")
  image_paths = [os.path.normpath(os.path.join(root, name)) for name, _ in rows]
  return image_paths, [caption for _, caption in rows]


def _pick_key(keys, wanted: tuple[str, ...], what: str, where: str) -> str:
  for key in wanted:
    if key in keys:
      return key
  raise DataError(f"{where}: no {what}; expected one of {', '.join(wanted)}, "
                  f"found {', '.join(map(str, keys)) or 'none'}.")


def _read_csv(index_path: str) -> list[tuple[str, str]]:
  with tf.io.gfile.GFile(index_path, "r") as f:
    reader = csv.DictReader(f)
    fields = [name.strip() for name in reader.fieldnames or []]
    reader.fieldnames = fields
    file_key = _pick_key(fields, FILE_NAME_KEYS, "file-name column", index_path)
    caption_key = _pick_key(fields, CAPTION_KEYS, "caption column", index_path)
    return [(row[file_key], row[caption_key] or "") for row in reader]


def _read_jsonl(index_path: str) -> list[tuple[str, str]]:
  rows, any_caption = [], False
  with tf.io.gfile.GFile(index_path, "r") as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{index_path} line {line_number}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{where} is not JSON: {e}") from e
      if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}.")
      file_key = _pick_key(list(row), FILE_NAME_KEYS, "file-name key", where)
      # A line without a caption is kept here and counted as an empty caption when read.
      caption_key = next((key for key in CAPTION_KEYS if key in row), None)
      caption = row.get(caption_key) if caption_key else None
      any_caption = any_caption or caption_key is not None
      rows.append((str(row[file_key]), "" if caption is None else str(caption)))
  if rows and not any_caption:
    raise DataError(f"{index_path}: no line has a caption; expected a key among "
                    f"{', '.join(CAPTION_KEYS)}.")
  return rows


def _check_process(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count}).")


def _shard_lists(path: str, process_index: int, process_count: int, *lists):
  """Every `process_count`-th item from `process_index`, for each parallel list."""
  if len(lists[0]) < process_count:
    raise DataError(f"{path} has {len(lists[0])} examples, fewer than the {process_count} hosts "
                    "reading it; every host needs at least one.")
  return tuple(items[process_index::process_count] for items in lists)


# ----------------------------------------------------------------------------- TFRecords

def _tfrecord_keys(files: list[str]) -> tuple[str, str]:
  """The image and caption feature keys, read from the first record found."""
  for file in files:
    for record in tf.data.TFRecordDataset(file).take(1):
      keys = sorted(tf.train.Example.FromString(record.numpy()).features.feature)
      return (_pick_key(keys, TFRECORD_IMAGE_KEYS, "image feature", file),
              _pick_key(keys, TFRECORD_CAPTION_KEYS, "caption feature", file))
  raise DataError(f"{files[0]} (and the other {len(files) - 1} files) hold no records.")
