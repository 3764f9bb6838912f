"""A module's fields <-> the JSON dict an export stores in model.json (`"kind"` names the model).

Shared by every model file so that exports, configs (`config.model`) and converters agree on
one format: the listed fields, dtypes as names, plus a few info keys (kind, source, ...).
"""

from typing import Any, Mapping, Sequence

import jax.numpy as jnp

from mmjax.errors import DataError


def to_dict(module, kind: str, fields: Sequence[str], info_fields: Sequence[str], info) -> dict:
  config = {"kind": kind}
  for field in fields:
    value = getattr(module, field)
    config[field] = jnp.dtype(value).name if field.endswith("dtype") else value
  unknown = sorted(set(info) - set(info_fields))
  if unknown:
    raise ValueError(f"model_config: unknown info fields {unknown}, expected some of {tuple(info_fields)}")
  config.update(info)
  return config


def module_kwargs(config: Mapping[str, Any], overrides, kind: str, fields: Sequence[str],
                  info_fields: Sequence[str]) -> dict:
  """The constructor arguments a `to_dict` dict (or a `config.model` ConfigDict) describes."""
  config = dict(config)
  config.update(overrides)
  if config.get("kind") != kind:
    raise DataError(f"model config kind={config.get('kind')!r}, expected {kind!r}")
  unknown = sorted(set(config) - set(fields) - set(info_fields))
  if unknown:
    raise DataError(f"{kind} model config has unknown fields {unknown}; expected some of {tuple(fields)}")
  kwargs = {k: v for k, v in config.items() if k in fields}
  for field in ("dtype", "param_dtype"):
    if field in kwargs:
      try:
        kwargs[field] = jnp.dtype(kwargs[field])
      except TypeError as e:
        raise DataError(f"{kind} model config {field}={kwargs[field]!r} is not a dtype name") from e
  return kwargs
