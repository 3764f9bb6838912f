"""Orbax checkpoints: resumable train state in `<workdir>/checkpoints`, and exported models.

An exported model is a directory holding `params/` (an Orbax PyTree) and `model.json` (the
model's config fields, enough to rebuild the Flax module). Trainers export their EMA
parameters this way and converters of OpenAI weights write the same layout, so every tool
loads either with `load_model`.
"""

import json
import os

import jax
import orbax.checkpoint as ocp
from etils import epath

from mmjax.errors import DataError

MODEL_JSON = "model.json"


def save_model(directory, params, model_config):
  """Writes params and their model config (a dict with at least `"kind"`) to `directory`."""
  directory = epath.Path(directory).absolute()
  directory.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory / "params", params, force=True)
  if jax.process_index() == 0:
    (directory / MODEL_JSON).write_text(json.dumps(dict(model_config), indent=1, sort_keys=True))


def load_model_config(directory, kind=None):
  path = epath.Path(directory) / MODEL_JSON
  if not path.exists():
    raise DataError(f"{directory}: not an exported mmjax model (no {MODEL_JSON}); "
                    "expected the output of a trainer's export or a convert_* tool")
  model_config = json.loads(path.read_text())
  if kind is not None and model_config.get("kind") != kind:
    raise DataError(f"{directory}: holds a {model_config.get('kind')!r} model, expected {kind!r}")
  return model_config


def check_shardings_divide(directory, abstract_tree):
  """DataError naming the first leaf of `abstract_tree` whose sharding does not split its shape
  evenly. Checked before Orbax starts reading: its own refusal comes from inside the parallel
  reads, whose stragglers then write to a closed event loop."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_tree):
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
      continue
    try:
      sharding.shard_shape(leaf.shape)
    except ValueError as error:
      raise DataError(f"{directory}: cannot restore {jax.tree_util.keystr(path)} of shape "
                      f"{tuple(leaf.shape)} into {sharding}: {error}") from None


def load_model(directory, kind=None, abstract_params=None):
  """Returns (params, model_config). With `abstract_params` (ShapeDtypeStructs carrying
  shardings) the arrays are restored straight into those shardings."""
  model_config = load_model_config(directory, kind)
  check_shardings_divide(directory, abstract_params)
  path = epath.Path(directory).absolute() / "params"
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(path, abstract_params)
  return params, model_config


class TrainCheckpoints:
  """Saves and restores (train state, per-host data iterator position) under `<workdir>/checkpoints`.

  Every host calls every method: Orbax coordinates the writes, and each host stores its own
  tf.data iterator position next to the step.
  """

  def __init__(self, workdir, max_to_keep=3, save_interval_steps=1):
    self.directory = epath.Path(workdir).absolute() / "checkpoints"
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=True))

  def latest_step(self):
    return self.manager.latest_step()

  def _data_dir(self, step):
    return os.fspath(self.directory / "data" / str(step))

  def save(self, step, state, data_iterator=None, force=False):
    saved = self.manager.save(step, args=ocp.args.StandardSave(state), force=force)
    if saved and data_iterator is not None:
      data_iterator.save(self._data_dir(step))
    return saved

  def restore(self, abstract_state, data_iterator=None, step=None):
    """Returns (state, step) for the latest (or given) step, or (None, 0) when there is none."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None, 0
    check_shardings_divide(self.directory / str(step), abstract_state)
    state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    if data_iterator is not None:
      data_iterator.restore(self._data_dir(step))
    return state, step

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
