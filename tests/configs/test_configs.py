"""Every shipped config loads and passes the pre-compile checks; bad fields fail naming the field."""

import importlib
import pathlib

import pytest

from mmjax.configs import validate
from mmjax.errors import ConfigError

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "mmjax" / "configs"
NOT_CONFIGS = {"__init__", "common", "validate"}
CONFIG_NAMES = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in NOT_CONFIGS)


def _config(name="shapes_preview", arg=None):
  module = importlib.import_module(f"mmjax.configs.{name}")
  return module.get_config() if arg is None else module.get_config(arg)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_loads_and_validates(name):
  config = _config(name)
  assert config.trainer
  assert "python -m mmjax" in importlib.import_module(f"mmjax.configs.{name}").__doc__
  validate.check_config(config, num_devices=8)


@pytest.mark.parametrize("field, value, match", [
    ("mesh.ici.tensor", 3, r"config\.mesh"),
    ("data.global_batch", 12, r"config\.data\.global_batch"),
    ("data.pixel_map", "sepia", r"config\.data\.pixel_map"),
    ("data.name", "imagenet", r"config\.data\.name"),
    ("data.image_size", 0, r"config\.data\.image_size"),
    ("data.random_shift", -1, r"config\.data\.random_shift: must be an int in \[0, data\.image_size\)"),
    ("data.grayscale_prob", 1.5, r"config\.data\.grayscale_prob: must be a probability"),
    ("trainer", "", r"config\.trainer"),
])
def test_bad_field_is_named(field, value, match):
  config = _config()
  with config.unlocked():
    parent, _, leaf = field.rpartition(".")
    (config if not parent else eval(f"config.{parent}"))[leaf] = value  # pylint: disable=eval-used
  with pytest.raises(ConfigError, match=match):
    validate.check_config(config, num_devices=8)


def test_batch_must_divide_over_processes():
  config = _config()
  config.data.global_batch = 40
  validate.check_config(config, num_devices=8, process_count=4)
  with pytest.raises(ConfigError, match=r"3 processes"):
    validate.check_config(config, num_devices=6, process_count=3)


def test_batch_axes_follow_the_rules():
  config = _config()
  assert validate.batch_axes_size(config, {"data": 2, "fsdp": 4, "tensor": 1}) == 8
  config.logical_axis_rules = (("activation_batch", "data"),)
  assert validate.batch_axes_size(config, {"data": 2, "fsdp": 4, "tensor": 1}) == 2
