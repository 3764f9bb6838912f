"""Scalars to TensorBoard (tensorboardX) and the log, written by process 0 only."""

import os

import jax
import numpy as np
from absl import logging


class MetricWriter:

  def __init__(self, workdir):
    self.writer = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write_scalars(self, step, scalars, prefix=""):
    values = {k: float(np.asarray(v)) for k, v in scalars.items()}
    if self.writer is None:
      return values
    for name, value in values.items():
      self.writer.add_scalar(prefix + name, value, step)
    self.writer.flush()
    logging.info("step %d: %s", step, ", ".join(f"{prefix}{k}={v:.4g}" for k, v in sorted(values.items())))
    return values

  def close(self):
    if self.writer is not None:
      self.writer.close()


def mean_scalars(history):
  """The mean of each scalar over a list of per-step scalar dicts (device arrays are fetched once)."""
  stacked = jax.device_get(history)
  return {k: float(np.mean([h[k] for h in stacked])) for k in stacked[0]}
