"""mmjax entry point.

  python -m mmjax.main --config=mmjax/configs/NAME.py[:ARG] --workdir=DIR [--config.FIELD=VALUE ...]

`config.trainer` picks what runs (see mmjax/train/registry.py). On a Cloud TPU VM the
distributed runtime is initialised before anything touches JAX devices; elsewhere pass
--distributed=on (with --coordinator_address etc. for CPU/GPU clusters). Logs on process 0 only.
"""

import os
import sys

from mmjax import host_memory

host_memory.keep_freed_memory()  # before JAX and TensorFlow start threads

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mmjax import cli  # noqa: E402
from mmjax.errors import ConfigError, DataError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, optionally with ':ARG' for get_config(ARG). "
    "Override any field with --config.FIELD=VALUE.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, data and outputs.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Call jax.distributed.initialize() first: auto = only on a Cloud TPU VM.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (with --distributed=on).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --distributed=on).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --distributed=on).")

flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed(mode, coordinator_address=None, num_processes=None, process_id=None):
  import jax  # pylint: disable=g-import-not-at-top
  if mode == "off" or (mode == "auto" and not host_memory.on_cloud_tpu_vm()):
    return
  if jax.config.jax_platforms == "cpu" or os.environ.get("JAX_PLATFORMS") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  initialize_distributed(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)

  import jax  # pylint: disable=g-import-not-at-top
  from mmjax import sharding  # pylint: disable=g-import-not-at-top
  from mmjax.configs import validate  # pylint: disable=g-import-not-at-top
  from mmjax.train import registry  # pylint: disable=g-import-not-at-top

  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  if not sys.stderr.isatty():
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tfds.disable_progress_bar()  # progress bars are noise in log files; the stages still log
  try:
    validate.check_config(config, num_devices=jax.device_count(), process_count=jax.process_count(),
                          num_slices=sharding.count_slices(jax.devices()))
    trainer = registry.get_trainer(config.trainer)
    logging.info("mmjax: trainer=%s workdir=%s devices=%d processes=%d", config.trainer,
                 _WORKDIR.value, jax.device_count(), jax.process_count())
    trainer.run(config, _WORKDIR.value)
  except (ConfigError, DataError) as e:
    sys.exit(f"mmjax: error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
