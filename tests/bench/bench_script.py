"""bench/ is scripts, not a package: its modules are loaded by path."""

import importlib.util
import pathlib

BENCH_DIR = pathlib.Path(__file__).resolve().parents[2] / "bench"


def load(name):
  """bench/<name>.py as a module (named bench_<name>)."""
  spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH_DIR / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
