"""Config checks that run before anything compiles: each failure is one line naming the field."""

from mmjax.errors import ConfigError

PIXEL_MAPS = ("dvae", "clip", "unit")
DATASETS = ("shapes", "digits", "mnist", "folder", "tfrecord")


def _require(condition, field, message):
  if not condition:
    raise ConfigError(f"config.{field}: {message}")


def batch_axes_size(config, mesh_shape):
  """How many ways the batch dimension is split: the mesh axes the rules give `activation_batch`."""
  rules = dict(config.logical_axis_rules)
  axes = rules.get("activation_batch")
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  size = 1
  for axis in axes:
    _require(axis in mesh_shape, "logical_axis_rules",
             f"'activation_batch' maps to mesh axis {axis!r}, expected one of {sorted(mesh_shape)}")
    size *= mesh_shape[axis]
  return size


def check_data(config, process_count, mesh_shape):
  data = config.data
  _require(data.name in DATASETS, "data.name", f"{data.name!r} is not one of {DATASETS}")
  _require(data.name not in ("folder", "tfrecord") or data.path, "data.path",
           f"required for data.name={data.name!r} (a folder or a TFRecord glob)")
  _require(data.image_size > 0, "data.image_size", f"must be positive, got {data.image_size}")
  _require(data.text_length > 0, "data.text_length", f"must be positive, got {data.text_length}")
  _require(data.pixel_map in PIXEL_MAPS, "data.pixel_map", f"{data.pixel_map!r} is not one of {PIXEL_MAPS}")
  shift = data.get("random_shift", 0)
  _require(isinstance(shift, int) and 0 <= shift < data.image_size, "data.random_shift",
           f"must be an int in [0, data.image_size), got {shift!r}")
  grey = data.get("grayscale_prob", 0.0)
  _require(isinstance(grey, (int, float)) and 0 <= grey <= 1, "data.grayscale_prob",
           f"must be a probability in [0, 1], got {grey!r}")
  batch = data.global_batch
  _require(batch > 0, "data.global_batch", f"must be positive, got {batch}")
  _require(batch % process_count == 0, "data.global_batch",
           f"{batch} does not divide over {process_count} processes")
  ways = batch_axes_size(config, mesh_shape)
  _require(batch % ways == 0, "data.global_batch",
           f"{batch} does not divide over the {ways}-way batch sharding "
           f"(config.mesh axes {dict(config.logical_axis_rules).get('activation_batch')})")


def check_config(config, num_devices, process_count=1, num_slices=None):
  """Raises ConfigError for the first field that cannot work on this many devices/processes.

  `num_slices=None` means the devices carry no slice information (CPU, single slice).
  """
  from mmjax.sharding import resolve_mesh_shape  # pylint: disable=g-import-not-at-top
  _require(bool(config.get("trainer")), "trainer", "must name a trainer (see mmjax/train/registry.py)")
  mesh_shape = resolve_mesh_shape(config.mesh, num_devices, num_slices)
  if "data" in config:
    check_data(config, process_count, mesh_shape)
  if "tokenizer" in config:
    _require(config.tokenizer.vocab_size >= 64, "tokenizer.vocab_size",
             f"must be at least 64, got {config.tokenizer.vocab_size}")
  return mesh_shape
