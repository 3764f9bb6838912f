r"""Compile a config's train step for a TPU slice on this (CPU) machine and report per-device memory.

  python -m mmjax.tools.aot --config=mmjax/configs/NAME.py[:ARG] --topology=v5e:4x4 \
      [--num_slices=2] [--config.FIELD=VALUE ...]

Needs libtpu (`pip install 'mmjax[aot]'`); no TPU. The trainer named by `config.trainer` must expose
`aot_train_step(config, mesh) -> (jitted_step, abstract_args)`. Prints XLA's per-device argument,
output, temporary and total bytes against the chip's HBM; exits 1 when the step does not fit and
2 when the config cannot be compiled (one line naming the reason).
"""

import os
import sys

# A compile-only check never needs a local accelerator; keep JAX off any attached TPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mmjax import cli  # noqa: E402
from mmjax.errors import ConfigError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, optionally with ':ARG' for get_config(ARG). "
    "Override any field with --config.FIELD=VALUE.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU slice to compile for, GENERATION:SHAPE, e.g. v5e:2x2, v5e:4x4, v4:4x4x4, "
    "v5p:2x2x1, v6e:2x2 (generations: v2 v3 v4 v5e v5p v6e). config.mesh must fit its devices.")
_NUM_SLICES = flags.DEFINE_integer(
    "num_slices", 1, "Number of slices (multi-slice over DCN); config.mesh.dcn sizes must multiply to it.")
_HBM_GIB = flags.DEFINE_float(
    "hbm_gib", None, "Override the HBM per device (GiB) that the step must fit in.")

flags.mark_flags_as_required(["config", "topology"])


def _fail(code, message):
  print(f"mmjax.tools.aot: {message}", file=sys.stderr)
  sys.exit(code)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  from mmjax import sharding  # pylint: disable=g-import-not-at-top
  from mmjax.train import registry  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  try:
    trainer = registry.get_trainer(config.trainer)
    if not hasattr(trainer, "aot_train_step"):
      _fail(2, f"config.trainer={config.trainer!r} has no train step to compile "
               f"({trainer.__name__} defines no aot_train_step(config, mesh))")
    mesh = sharding.topology_mesh(_TOPOLOGY.value, config.mesh, _NUM_SLICES.value)
    step, abstract_args = trainer.aot_train_step(config, mesh)
    compiled = sharding.compile_for_mesh(step, abstract_args, mesh, config.logical_axis_rules)
  except sharding.DoesNotFitError as e:
    _fail(1, f"does not fit {_TOPOLOGY.value}: {e}")
  except (ConfigError, ImportError) as e:
    _fail(2, str(e))
  report = sharding.memory_report(compiled, _TOPOLOGY.value, mesh.size, hbm_gib=_HBM_GIB.value)
  print(f"config.trainer={config.trainer} mesh={dict(mesh.shape)}")
  print(report.table())
  if not report.fits:
    _fail(1, f"does not fit {_TOPOLOGY.value}: {sharding.format_bytes(report.total_bytes)} per device > "
             f"{sharding.format_bytes(report.hbm_bytes)} HBM per {report.device_kind} device")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
