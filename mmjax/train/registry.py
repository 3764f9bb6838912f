"""Maps `config.trainer` to the module that runs it.

A trainer module exposes `run(config, workdir)`; one that has a train step also exposes
`aot_train_step(config, mesh) -> (jitted_step, abstract_args)` so `mmjax.tools.aot` can
compile it for a TPU slice. A dotted name (`my_pkg.my_trainer`) imports that module, so
users can plug in their own trainers without editing this table.
"""

import importlib

from mmjax.errors import ConfigError

TRAINERS = {
    "preview": "mmjax.train.preview",
    "dvae": "mmjax.train.dvae",
    "dvae_encode": "mmjax.train.dvae_encode",
    "dalle": "mmjax.train.dalle",
    "clip": "mmjax.train.clip",
    "shapes_samples": "mmjax.train.shapes_samples",
    "demo": "mmjax.train.demo",
}


def get_trainer(name):
  if name in TRAINERS:
    return importlib.import_module(TRAINERS[name])
  if "." in name:
    try:
      return importlib.import_module(name)
    except ImportError as e:
      raise ConfigError(f"config.trainer={name!r}: cannot import that module ({e})") from e
  raise ConfigError(f"config.trainer={name!r}: expected one of {sorted(TRAINERS)} or a dotted module path")
