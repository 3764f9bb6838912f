"""Errors raised at mmjax's boundaries: each names the config field, file or key at fault."""


class ConfigError(ValueError):
  """A config value cannot work; the message names the field (e.g. `config.mesh.ici.tensor`)."""


class DataError(ValueError):
  """A dataset, file or checkpoint is missing or malformed; the message names it."""
