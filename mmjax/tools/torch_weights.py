"""Reading PyTorch weight files for the converters: state dicts, pickled modules, TorchScript archives.

`load_torch_object` returns what the file holds (a module's `state_dict()` for modules and
TorchScript archives, else the unpickled object); `tensors_to_numpy` checks it is a flat
{key: tensor} dict and turns it into float32 numpy arrays. Failures are DataErrors naming the file.
"""

import os
import pickle
import warnings
import zipfile

from absl import logging

from mmjax.errors import DataError


def _not_torch(path, error):
  reason = " ".join(str(error).split())[:200]
  return DataError(f"{path}: not a torch save file ({type(error).__name__}: {reason})")


def is_torchscript_archive(path):
  """A TorchScript zip (torch.jit.save, OpenAI's CLIP releases) holds `<archive>/constants.pkl`."""
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as archive:
    return any(name.split("/")[-1] == "constants.pkl" for name in archive.namelist())


def load_torch_object(path, module_hint="convert a state_dict instead"):
  """The state dict of a TorchScript archive or a pickled nn.Module, or whatever else the file holds.

  Plain state dicts load with `weights_only=True` (no code runs). A pickled module needs full
  unpickling, which runs code: `module_hint` tells the user what to install or do when the
  module's class cannot be imported. TorchScript archives load with `torch.jit.load`, which
  interprets TorchScript rather than running pickled Python.
  """
  import torch  # pylint: disable=g-import-not-at-top  (only the converters need torch)
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such file")
  if is_torchscript_archive(path):
    try:
      with warnings.catch_warnings():  # torch deprecates TorchScript, but OpenAI's releases are TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(path, map_location="cpu").state_dict()
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(f"{path}: a TorchScript archive torch.jit.load cannot read ({e})") from e
  try:
    loaded = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError:
    logging.info("%s: not a plain state_dict; unpickling it as a module", path)
    try:
      loaded = torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as e:
      raise DataError(f"{path}: unpickling needs the module that defined it ({e}); {module_hint}") from e
    except Exception as e:  # pylint: disable=broad-except
      raise _not_torch(path, e) from e
  except Exception as e:  # torch raises RuntimeError/EOFError/... for files that are not torch saves
    raise _not_torch(path, e) from e
  if isinstance(loaded, torch.nn.Module):
    loaded = loaded.state_dict()
  return loaded


def tensors_to_numpy(loaded, path, expected="a state_dict"):
  """{key: float32 numpy array} from a {key: tensor} dict; DataError naming `path` otherwise."""
  import torch  # pylint: disable=g-import-not-at-top
  if not isinstance(loaded, dict):
    raise DataError(f"{path}: holds a {type(loaded).__name__}, expected {expected}")
  state = {}
  for key, value in loaded.items():
    if not isinstance(value, torch.Tensor):
      raise DataError(f"{path}: key {key!r} holds a {type(value).__name__}, expected a tensor")
    state[key] = value.detach().cpu().float().numpy()
  return state


def load_state_dict(path, expected="a state_dict", module_hint="convert a state_dict instead"):
  """`tensors_to_numpy(load_torch_object(path))`."""
  return tensors_to_numpy(load_torch_object(path, module_hint), path, expected)
