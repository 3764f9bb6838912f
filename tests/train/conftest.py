"""Fixtures the trainer tests share."""

import pytest


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A TFDS directory per test module: its builds are shared by that module's runs."""
  return str(tmp_path_factory.mktemp("tfds"))
