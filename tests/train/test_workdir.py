"""prepare_data: TFDS builds on process 0 only, behind a barrier every process reaches."""

import pathlib

import jax
from jax.experimental import multihost_utils
import pytest

from mmjax.configs import common
from mmjax.input_pipeline import datasets
from mmjax.train import workdir as workdir_lib


def _config(name="digits", data_dir=""):
  config = common.base_config()
  config.data = common.data_config(name=name, image_size=8)
  config.data.data_dir = data_dir
  return config


def _files(directory):
  """path -> (size, mtime_ns) of every file under directory."""
  return {str(f): (f.stat().st_size, f.stat().st_mtime_ns)
          for f in pathlib.Path(directory).rglob("*") if f.is_file()}


class Barriers(list):
  """Each barrier hit, as (name, how many files `directory` held then)."""
  directory = ""

  def sync_global_devices(self, name):
    self.append((name, len(_files(self.directory))))


@pytest.fixture
def barriers(monkeypatch):
  """Pretends to be one of 2 processes, recording the barriers instead of waiting at them."""
  hits = Barriers()
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "sync_global_devices", hits.sync_global_devices)
  return hits


def test_prepare_data_builds_once_and_returns_the_data_dir(tmp_path):
  config = _config()
  directory = workdir_lib.prepare_data(config, tmp_path)
  assert directory == str(tmp_path / "tfds") == workdir_lib.data_dir(config, tmp_path)
  built = _files(directory)
  assert any(name.endswith("dataset_info.json") for name in built)
  builder = datasets.tfds_builder(config.data, directory)
  assert builder.info.splits["validation"].num_examples == 179
  # a second call finds the build and leaves every file as it was
  assert workdir_lib.prepare_data(config, tmp_path) == directory
  assert _files(directory) == built


def test_only_process_zero_builds_and_every_process_waits(tmp_path, monkeypatch, barriers):
  shared = str(tmp_path / "shared_tfds")
  barriers.directory = shared
  config = _config(data_dir=shared)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  assert workdir_lib.prepare_data(config, tmp_path / "host1") == shared
  assert barriers == [("prepare_data", 0)]  # waited without writing a file
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  workdir_lib.prepare_data(config, tmp_path / "host0")
  name, files_at_barrier = barriers[1]
  assert name == "prepare_data" and files_at_barrier == len(_files(shared)) > 0  # built, then waited


def test_users_files_need_no_preparation(tmp_path, monkeypatch, barriers):
  barriers.directory = tmp_path
  config = _config("folder")
  config.data.path = str(tmp_path / "photos")
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  assert workdir_lib.prepare_data(config, tmp_path) == str(tmp_path / "tfds")
  assert not _files(tmp_path) and not barriers
