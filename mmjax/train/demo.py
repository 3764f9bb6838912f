"""The whole DALL·E + CLIP pipeline in one workdir: what `make demo` runs on the shapes set.

  python -m mmjax.main --config=mmjax/configs/shapes_demo.py --workdir=demo_workdir

Stages, each an ordinary trainer run on its own config (`config.stages.<name>`) in its own
subdirectory, in this order:

  tokenizer   sentencepiece BPE of the encode and dalle stages      <workdir>/tokenizer/spm.model
  dvae        the image tokenizer (mmjax/train/dvae.py)             <workdir>/dvae/dvae (export)
  encode      argmax codes + text tokens of every split              <workdir>/tokens
  dalle       the transformer on those tokens                        <workdir>/dalle/dalle (export)
  clip        the reranker on image–caption pairs                    <workdir>/clip/clip (export)
  samples     captions of the test split → candidates → CLIP rerank   <workdir>/samples.png, metrics.json

All stages share one TFDS build (<workdir>/tfds). A stage that finished writes `stage.json` with
the config it ran; a second run skips it when the config is unchanged and refuses (naming the
stage) when it changed, rather than mixing outputs of two configs. An interrupted stage resumes
from its own checkpoints.
"""

import json
import os
import time

import jax
from absl import logging

from mmjax.configs import validate
from mmjax.errors import ConfigError
from mmjax.train import registry, workdir as workdir_lib

STAGES = ("dvae", "encode", "dalle", "clip", "samples")
STAGE_FILE = "stage.json"


def stage_workdirs(workdir):
  """Where each stage runs: its own subdirectory, except samples, which writes samples.png and
  metrics.json into the workdir itself. The encode stage writes <workdir>/tokens via its config."""
  dirs = {name: os.path.join(workdir, name) for name in STAGES}
  dirs["samples"] = workdir
  return dirs


def wire_stages(config, workdir):
  """The stage configs with the paths that connect them filled in (a copy; `config` is unchanged)."""
  stages = config.stages.copy_and_resolve_references()
  dirs = stage_workdirs(workdir)
  shared = {"data_dir": os.path.join(workdir, "tfds")}
  tokenizer_path = os.path.join(workdir, "tokenizer", "spm.model")
  for name in ("dvae", "encode", "dalle", "clip"):
    stages[name].data.update(shared)
  for name in ("encode", "dalle"):  # CLIP trains its own, smaller tokenizer and exports it
    stages[name].tokenizer.model_path = tokenizer_path
  stages.encode.dvae_checkpoint = os.path.join(dirs["dvae"], "dvae")
  stages.encode.output_dir = os.path.join(workdir, "tokens")
  stages.dalle.data.tokens_dir = stages.encode.output_dir
  samples = stages.samples
  samples.dalle = os.path.join(dirs["dalle"], "dalle")
  samples.dvae = stages.encode.dvae_checkpoint
  samples.clip = os.path.join(dirs["clip"], "clip")
  samples.tokenizer = tokenizer_path
  samples.data_dir = shared["data_dir"]
  samples.tokens_dir = stages.encode.output_dir
  return stages


WORKDIR_TOKEN = "<workdir>"


def _stage_record(stage_config, workdir):
  """The stage's config as JSON, with the workdir in its wired paths written as <workdir>: a
  workdir that was moved, or named relative rather than absolute, still matches its records."""
  prefix = os.path.normpath(workdir)

  def relative(value):
    if isinstance(value, dict):
      return {key: relative(item) for key, item in value.items()}
    if isinstance(value, list):
      return [relative(item) for item in value]
    if isinstance(value, str) and value and (value == prefix or value.startswith(prefix + os.sep)):
      return WORKDIR_TOKEN + value[len(prefix):]
    return value

  return relative(json.loads(stage_config.to_json_best_effort(sort_keys=True)))


def _finished(name, directory, stage_config, workdir):
  path = os.path.join(directory, STAGE_FILE)
  if not os.path.exists(path):
    return False
  with open(path) as f:
    saved = json.load(f)
  if saved.get("config") != _stage_record(stage_config, workdir):
    # The samples stage writes into the workdir itself: only its record goes, not the other stages.
    remove = path if os.path.normpath(directory) == os.path.normpath(workdir) else directory
    raise ConfigError(f"config.stages.{name} differs from the config stage {name!r} finished with in "
                      f"{directory}; use a new --workdir or delete {remove} to run it again")
  return True


def _mark_finished(directory, stage_config, workdir, seconds):
  if jax.process_index() == 0:
    with open(os.path.join(directory, STAGE_FILE), "w") as f:
      json.dump({"config": _stage_record(stage_config, workdir), "seconds": seconds}, f, indent=1)


def check_stages(stages):
  """Every trainer stage's config is checked before the first one starts."""
  for name in ("dvae", "encode", "dalle", "clip"):
    try:
      validate.check_config(stages[name], num_devices=jax.device_count(),
                            process_count=jax.process_count())
      checker = getattr(registry.get_trainer(stages[name].trainer), "check_config", None)
      if checker:
        checker(stages[name])
    except ConfigError as e:
      raise ConfigError(f"stages.{name}: {e}") from e


def run(config, workdir):
  os.makedirs(workdir, exist_ok=True)
  stages = wire_stages(config, workdir)
  check_stages(stages)
  dirs = stage_workdirs(workdir)
  start = time.perf_counter()

  # The shared data and tokenizer, before any stage reads them.
  workdir_lib.prepare_data(stages.dvae, workdir)
  # The user's encode config (model_path "" = <workdir>/tokenizer/spm.model) trains it when missing.
  workdir_lib.ensure_tokenizer(config.stages.encode, workdir)

  for number, name in enumerate(STAGES, 1):
    directory = dirs[name]
    if _finished(name, directory, stages[name], workdir):
      logging.info("[%d/%d] %s: finished earlier in %s, reused", number, len(STAGES), name, directory)
      print(f"[{number}/{len(STAGES)}] {name}: reused ({directory})", flush=True)
      continue
    print(f"[{number}/{len(STAGES)}] {name}: running in {directory} "
          f"({time.perf_counter() - start:.0f} s so far)", flush=True)
    os.makedirs(directory, exist_ok=True)
    stage_start = time.perf_counter()
    registry.get_trainer(stages[name].trainer).run(stages[name], directory)
    seconds = time.perf_counter() - stage_start
    _mark_finished(directory, stages[name], workdir, seconds)
    print(f"[{number}/{len(STAGES)}] {name}: done in {seconds:.0f} s", flush=True)
  print(f"demo: all stages done in {time.perf_counter() - start:.0f} s; see "
        f"{os.path.join(workdir, 'samples.png')} and metrics.json", flush=True)
