"""The demo's last stage: captions of the shapes test split → DALL·E candidates → CLIP rerank → oracle.

Reads the dalle, dvae and clip exports the earlier stages wrote (paths in `config.dalle`,
`config.dvae`, `config.clip`, filled in by mmjax/train/demo.py) and writes to the workdir:

  samples.png    the first `grid_captions` captions, each above its `top` best candidates
  samples.json   every shown candidate's seed and CLIP score (mmjax.generate's record)
  metrics.json   the shapes oracle's accuracy (colour, shape, size, relation, all) of
                 "first": the first sample of each caption (what one sample gives), and
                 "reranked": the candidate CLIP scores highest among `num_candidates`,
                 over all captions and separately over one- and two-object captions.

Captions are the test split's distinct captions in file order, `num_captions` of them. Every
test scene holds a colour–shape pair that the train split never shows (shapes.py), so the model
has to compose attributes it only saw apart.
"""

import collections
import json
import os

import jax
import numpy as np
from absl import logging

from mmjax import generate
from mmjax.errors import ConfigError
from mmjax.input_pipeline import datasets
from mmjax.tools import shapes_oracle

ORACLE_KEYS = ("colour", "shape", "size", "relation", "all")


def test_captions(config):
  """The first `num_captions` distinct captions of the test split (ConfigError when too few)."""
  distinct = list(dict.fromkeys(datasets.captions(config.data, config.data_dir, split=config.split)))
  if len(distinct) < config.num_captions:
    raise ConfigError(f"config.num_captions={config.num_captions}: the {config.split} split has only "
                      f"{len(distinct)} distinct captions")
  return distinct[:config.num_captions]


def oracle_accuracy(images, captions):
  """{group: {key: fraction}} over all captions and by object count ("one_object", "two_objects")."""
  groups = collections.defaultdict(list)
  for image, caption in zip(images, captions):
    result = shapes_oracle.score(image, caption)
    count = len(shapes_oracle.parse_caption(caption).objects)
    groups["all_captions"].append(result)
    groups["one_object" if count == 1 else "two_objects"].append(result)
  report = {}
  for group, results in groups.items():
    accuracy = shapes_oracle.accuracy(results)
    report[group] = {"captions": len(results), **{k: accuracy[k] for k in ORACLE_KEYS if k in accuracy}}
  return report


def run(config, workdir):
  if config.top > config.num_candidates:
    raise ConfigError(f"config.top={config.top} exceeds config.num_candidates={config.num_candidates}")
  captions = test_captions(config)
  generator = generate.Generator(config.dalle, config.dvae, config.clip, tokenizer=config.tokenizer)
  settings = generate.SamplingSettings(temperature=config.temperature, top_k=config.top_k,
                                       top_p=config.top_p)
  logging.info("Sampling %d candidates for each of %d test captions", config.num_candidates, len(captions))
  samples = generator.generate(captions, config.num_candidates, config.top, settings, seed=config.seed,
                               batch_size=config.batch_size)
  first = samples.images[:, 0]
  best = samples.images[np.arange(len(captions)), samples.kept[:, 0]]
  metrics = {
      "captions": len(captions), "num_candidates": config.num_candidates, "split": config.split,
      "sampling": {"temperature": config.temperature, "top_k": config.top_k, "top_p": config.top_p},
      "first": oracle_accuracy(first, captions),
      "reranked": oracle_accuracy(best, captions),
  }
  if jax.process_index() == 0:
    shown = generate.Samples(captions[:config.grid_captions], samples.codes[:config.grid_captions],
                             samples.images[:config.grid_captions], samples.seeds[:config.grid_captions],
                             None if samples.scores is None else samples.scores[:config.grid_captions],
                             samples.kept[:config.grid_captions])
    generate.write_outputs(shown, os.path.join(workdir, "samples.png"),
                           os.path.join(workdir, "samples.json"), {"settings": metrics["sampling"]})
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
      json.dump(metrics, f, indent=1)
    for name in ("first", "reranked"):
      for group, values in metrics[name].items():
        print(f"oracle {name:9s} {group:13s} " + "  ".join(
            f"{k} {values[k]:.3f}" for k in ORACLE_KEYS if k in values) + f"  ({values['captions']} captions)")
  return metrics
