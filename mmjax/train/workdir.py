"""Where a run keeps its shared artefacts inside the workdir, and the stages that create them."""

import os

import jax
from absl import logging


def data_dir(config, workdir):
  return config.data.data_dir or os.path.join(workdir, "tfds")


def prepare_data(config, workdir):
  """Builds the configured TFDS dataset into data_dir on process 0 while the others wait; returns
  data_dir.

  Run it on every process before anything reads the data: hosts sharing data_dir (a network disk)
  then never race to write the same files, and all of them find it built. A host whose data_dir is
  its own local disk still builds its copy on first use, as before. Folder / TFRecord data and a
  dataset already built need nothing: TFDS finds the finished build and leaves it as it is.
  """
  from mmjax.input_pipeline import datasets  # pylint: disable=g-import-not-at-top
  directory = data_dir(config, workdir)
  if config.data.name not in datasets.TFDS_NAMES:
    return directory
  if jax.process_index() == 0:
    datasets.tfds_builder(config.data, directory)
  _wait_for_all_processes("prepare_data")
  return directory


def tokenizer_path(config, workdir):
  return config.tokenizer.model_path or os.path.join(workdir, "tokenizer", "spm.model")


def ensure_tokenizer(config, workdir):
  """Loads the run's tokenizer, training it first (on process 0) if the workdir has none."""
  from mmjax.input_pipeline import tokenizer as tok  # pylint: disable=g-import-not-at-top
  path = tokenizer_path(config, workdir)
  if not os.path.exists(path):
    if config.tokenizer.model_path:
      from mmjax.errors import DataError  # pylint: disable=g-import-not-at-top
      raise DataError(f"config.tokenizer.model_path={path!r} does not exist")
    if jax.process_index() == 0:
      logging.info("Training a %d-piece tokenizer on corpus %r -> %s",
                   config.tokenizer.vocab_size, config.tokenizer.corpus, path)
      corpus = config.tokenizer.corpus
      if corpus == "dataset":
        from mmjax.input_pipeline import datasets  # pylint: disable=g-import-not-at-top
        corpus = datasets.captions(config.data, data_dir(config, workdir))
      tok.train_tokenizer(corpus, path[:-len(".model")], config.tokenizer.vocab_size)
    _wait_for_all_processes("tokenizer")
  return tok.Tokenizer(path)


def _wait_for_all_processes(name):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)
