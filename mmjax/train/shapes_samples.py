"""The demo's last stage: captions of the shapes test split → DALL·E candidates → CLIP rerank → oracle.

Reads the dalle, dvae and clip exports the earlier stages wrote (paths in `config.dalle`,
`config.dvae`, `config.clip`, filled in by mmjax/train/demo.py) and writes to the workdir:

  samples.png    `grid_captions` captions (half one-object, half two-object), each above its
                 `top` best candidates
  samples.json   every shown candidate's seed and CLIP score (mmjax.generate's record)
  metrics.json   the shapes oracle's accuracy (colour, shape, size, relation, all) of
                 "first": the first sample of each caption (what one sample gives), and
                 "reranked": the candidate CLIP scores highest among `num_candidates`,
                 "oracle_best": the candidate the oracle itself rates best (all attributes right
                 first, then the most right): what a perfect reranker would reach,
                 each over all captions and separately over one- and two-object captions;
                 "likelihood_preference" (when the token files are given): how often the
                 transformer scores a test image's true codes likeliest under its own caption
                 rather than one with another colour / shape / size word. It tells what the
                 model learned apart from sampling: a high preference with samples at chance
                 means the sampler, not the model, loses the attribute.

Captions are the test split's distinct captions in file order: the first
`num_one_object_captions` one-object and the first `num_two_object_captions` two-object ones
(the one-object group is the issue's target: ≥ 100 of them, ≥ 80% all-attribute). Every
test scene holds a colour–shape pair that the train split never shows (shapes.py), so the model
has to compose attributes it only saw apart.
"""

import collections
import json
import os
import re

import jax
import numpy as np
from absl import logging

from mmjax import generate
from mmjax.errors import ConfigError
from mmjax.input_pipeline import datasets, shapes_render, token_files
from mmjax.tools import shapes_oracle

ORACLE_KEYS = ("colour", "shape", "size", "relation", "all")


def object_count(caption):
  return len(shapes_oracle.parse_caption(caption).objects)


def test_captions(config):
  """The first distinct one-object, then two-object captions of the split (ConfigError when too few)."""
  distinct = list(dict.fromkeys(datasets.captions(config.data, config.data_dir, split=config.split)))
  chosen = []
  for count, wanted in ((1, config.num_one_object_captions), (2, config.num_two_object_captions)):
    group = [c for c in distinct if object_count(c) == count]
    if len(group) < wanted:
      noun = "one-object" if count == 1 else "two-object"
      raise ConfigError(f"config.num_{'one' if count == 1 else 'two'}_object_captions={wanted}: the "
                        f"{config.split} split has only {len(group)} distinct {noun} captions")
    chosen += group[:wanted]
  if not chosen:
    raise ConfigError("config.num_one_object_captions and num_two_object_captions are both 0")
  return chosen


def grid_rows(captions, rows):
  """Indices of the captions shown in samples.png: half one-object, half two-object."""
  one = [i for i, c in enumerate(captions) if object_count(c) == 1]
  two = [i for i, c in enumerate(captions) if object_count(c) == 2]
  take_one = min(len(one), max(rows - len(two), (rows + 1) // 2))
  return one[:take_one] + two[:rows - take_one]


def oracle_accuracy(images, captions):
  """{group: {key: fraction}} over all captions and by object count ("one_object", "two_objects")."""
  groups = collections.defaultdict(list)
  for image, caption in zip(images, captions):
    result = shapes_oracle.score(image, caption)
    groups["all_captions"].append(result)
    groups["one_object" if object_count(caption) == 1 else "two_objects"].append(result)
  report = {}
  for group, results in groups.items():
    accuracy = shapes_oracle.accuracy(results)
    report[group] = {"captions": len(results), **{k: accuracy[k] for k in ORACLE_KEYS if k in accuracy}}
  return report


def oracle_best(candidates, captions):
  """Index per caption of the candidate with all attributes right, else the most right (the first
  on ties): candidates [n_captions, n_candidates, H, W, 3]."""
  def rank(image, caption):
    result = shapes_oracle.score(image, caption)
    return (result["all"], sum(bool(result[k]) for k in ORACLE_KEYS[:-1] if result.get(k) is not None))
  return np.array([max(range(len(row)), key=lambda i, row=row, c=c: rank(row[i], c))
                   for row, c in zip(candidates, captions)])


ATTRIBUTE_WORDS = {"colour": shapes_render.COLOUR_NAMES, "shape": shapes_render.SHAPES,
                   "size": shapes_render.SIZES}


def word_swaps(caption, words):
  """(index of the caption's word among `words`, the caption with each of `words` in its place), or
  None when the caption holds none of them (a caption without a size word)."""
  for index, word in enumerate(words):
    pattern = re.compile(rf"\b{word}\b")
    if pattern.search(caption):
      return index, [pattern.sub(other, caption) for other in words]
  return None


GUIDE_AGAINST = ("", "colour", "shape")


def negative_captions(captions, attribute):
  """Per caption, the caption with each other word of `attribute` (colour or shape) in place of its
  own (a two-object caption: its first such word, wherever it occurs): what guidance steers away from."""
  negatives = []
  for caption in captions:
    swaps = word_swaps(caption, ATTRIBUTE_WORDS[attribute])
    if swaps is None:
      raise ConfigError(f"config.guide_against={attribute!r}: the caption {caption!r} has no {attribute} word")
    index, variants = swaps
    negatives.append(variants[:index] + variants[index + 1:])
  return negatives


def likelihood_preference(captions, image_codes, nll_fn):
  """{attribute: fraction of examples whose codes are strictly likeliest under their own word}.

  For each caption and attribute (colour, shape, size), the caption is rewritten with every word
  of that attribute and `nll_fn(captions, codes)` (−log p of the codes under each caption, [n])
  scores the true codes under each: the transformer "prefers" the truth when its own caption wins.
  This is what the model learned, free of sampling: compare it with the oracle on samples.
  """
  wins, counts = collections.Counter(), collections.Counter()
  for caption, codes in zip(captions, image_codes):
    for attribute, words in ATTRIBUTE_WORDS.items():
      swaps = word_swaps(caption, words)
      if swaps is None:
        continue
      index, variants = swaps
      nll = np.asarray(nll_fn(variants, np.stack([codes] * len(variants))))
      counts[attribute] += 1
      wins[attribute] += bool(nll[index] < np.delete(nll, index).min())
  return {"examples": len(captions), **{a: wins[a] / counts[a] for a in ATTRIBUTE_WORDS if counts[a]}}


def one_object_codes(tokens_dir, split, count):
  """(captions, image codes [n, N]) of the first `count` one-object examples of an encoded split."""
  captions, codes = [], []
  for example in token_files.token_dataset(tokens_dir, split, 0, 1).as_numpy_iterator():
    caption = example["caption"].decode()
    if object_count(caption) == 1:
      captions.append(caption)
      codes.append(example["image_tokens"])
    if len(captions) == count:
      break
  return captions, np.stack(codes) if codes else np.zeros((0, 0), np.int32)


def sampling_settings(config):
  """(SamplingSettings, the guidance record for metrics.json) from the stage config."""
  if config.guide_against not in GUIDE_AGAINST:
    raise ConfigError(f"config.guide_against={config.guide_against!r}: expected one of {GUIDE_AGAINST}")
  if config.guide_against and config.guidance_scale is None:
    raise ConfigError(f"config.guide_against={config.guide_against!r} needs config.guidance_scale")
  settings = generate.SamplingSettings(temperature=config.temperature, top_k=config.top_k,
                                       top_p=config.top_p, guidance_scale=config.guidance_scale)
  record = {"temperature": config.temperature, "top_k": config.top_k, "top_p": config.top_p,
            "guidance_scale": config.guidance_scale, "guide_against": config.guide_against or "no caption"}
  return settings, record


def run(config, workdir):
  if config.top > config.num_candidates:
    raise ConfigError(f"config.top={config.top} exceeds config.num_candidates={config.num_candidates}")
  settings, sampling = sampling_settings(config)
  captions = test_captions(config)
  negatives = negative_captions(captions, config.guide_against) if config.guide_against else None
  generator = generate.Generator(config.dalle, config.dvae, config.clip, tokenizer=config.tokenizer)
  logging.info("Sampling %d candidates for each of %d test captions", config.num_candidates, len(captions))
  samples = generator.generate(captions, config.num_candidates, config.top, settings, seed=config.seed,
                               batch_size=config.batch_size, negative_prompts=negatives)
  first = samples.images[:, 0]
  rows = np.arange(len(captions))
  best = samples.images[rows, samples.kept[:, 0]]
  ideal = samples.images[rows, oracle_best(samples.images, captions)]
  metrics = {
      "captions": len(captions), "num_candidates": config.num_candidates, "split": config.split,
      "sampling": sampling,
      "first": oracle_accuracy(first, captions),
      "reranked": oracle_accuracy(best, captions),
      "oracle_best": oracle_accuracy(ideal, captions),
  }
  if config.tokens_dir:
    held_out, codes = one_object_codes(config.tokens_dir, config.split, config.num_one_object_captions)
    metrics["likelihood_preference"] = likelihood_preference(held_out, codes, generator.image_nll)
  if jax.process_index() == 0:
    rows = grid_rows(captions, config.grid_captions)
    shown = generate.Samples([captions[i] for i in rows], samples.codes[rows], samples.images[rows],
                             samples.seeds[rows], None if samples.scores is None else samples.scores[rows],
                             samples.kept[rows],
                             None if negatives is None else [negatives[i] for i in rows])
    generate.write_outputs(shown, os.path.join(workdir, "samples.png"),
                           os.path.join(workdir, "samples.json"), {"settings": metrics["sampling"]})
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
      json.dump(metrics, f, indent=1)
    if "likelihood_preference" in metrics:
      print("transformer likelihood prefers the true word: " + "  ".join(
          f"{k} {v:.3f}" for k, v in metrics["likelihood_preference"].items() if k != "examples"))
    for name in ("first", "reranked", "oracle_best"):
      for group, values in metrics[name].items():
        print(f"oracle {name:11s} {group:13s} " + "  ".join(
            f"{k} {values[k]:.3f}" for k in ORACLE_KEYS if k in values) + f"  ({values['captions']} captions)")
  return metrics
