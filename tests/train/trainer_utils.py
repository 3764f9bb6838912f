"""Helpers the trainer tests share: run a config as `mmjax.main` would, read back TensorBoard scalars."""

import glob
import os

import jax
import tensorflow as tf

from mmjax.configs import validate
from mmjax.train import registry


def run_like_main(config, workdir):
  """What `python -m mmjax.main` does once flags are parsed: check the config, dispatch, run."""
  validate.check_config(config, num_devices=jax.device_count())
  return registry.get_trainer(config.trainer).run(config, str(workdir))


def scalars(workdir, tag):
  """{step: value} of a TensorBoard scalar written by the run."""
  values = {}
  for path in glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == tag:
          values[event.step] = value.simple_value
  return values
