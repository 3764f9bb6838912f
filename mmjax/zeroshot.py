r"""CLIP zero-shot classification: class names × prompt templates → a linear classifier over images.

  python -m mmjax.zeroshot --checkpoint=DIR --dataset=shapes --split=test
  python -m mmjax.zeroshot --checkpoint=DIR --dataset=mnist --split=test [--data_dir=...]

DIR is an exported CLIP: a trainer's export (`<workdir>/clip`, with the tokenizer it was trained
with) or `mmjax.tools.convert_openai_clip`'s output (OpenAI's BPE, found in an installed
clip/open_clip or given with --tokenizer). Prints top-1 / top-5 accuracy.

The classifier is CLIP's (Radford et al. 2021, §3.1.4): for each class, the text embeddings of its
prompts are L2-normalised, averaged, and the mean renormalised; an image's logits are
100 · cos(image embedding, class embedding).

Tasks (`TASKS`), each a labelled split that never went through the training pipeline:
  shapes        42 classes, one per colour + shape ("a red triangle"). The images are the
                *one-object* scenes of the shapes split, drawn by the same seeded generator as the
                TFDS builder at the model's image size (shapes.generate_scenes). On the test split each
                such scene shows a (colour, shape) pair that train and validation never show
                (shapes.HELD_OUT_COLOUR_SHAPES), so test accuracy is accuracy on held-out pairs.
  digits, mnist 10 classes, the digit words; prompts are the captions' templates
                (digits.CAPTION_TEMPLATES); images from the TFDS builders' stratified splits.

API: `load(checkpoint)` → (Encoder, tokenizer); `evaluate(encoder, tokenizer, task_name, split, ...)`
(or `ZeroShotEval`, which reads the split once, for repeated evals); the pieces: `class_embeddings`,
`classify`, `top_k_accuracy`, `labelled_split`.
"""

import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Callable

import jax
import numpy as np
from absl import app, flags
from jax.experimental import multihost_utils

from mmjax import sharding
from mmjax.configs import common
from mmjax.errors import ConfigError, DataError
from mmjax.models import clip
from mmjax.train import checkpoint as checkpoint_lib

LOGIT_SCALE = 100.0
TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_FILE = "spm.model"


# ----------------------------------------------------------------------------- tasks

@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  class_names: tuple[str, ...]
  prompts: tuple[tuple[str, ...], ...]    # per class, every prompt text
  # (split, image_size, data_dir) → (uint8 images [N, S, S, 3], int labels [N])
  read_split: Callable[..., tuple[np.ndarray, np.ndarray]]


def _with_article(words):
  return ("an " if words[0] in "aeiou" else "a ") + words


def _shapes_task():
  from mmjax.input_pipeline import shapes, shapes_render  # pylint: disable=g-import-not-at-top
  pairs = shapes_render.ALL_COLOUR_SHAPES
  names = tuple(f"{colour} {shape}" for colour, shape in pairs)
  # The one-object caption templates ("{a}", "an image of {a}", ...), with the unsized noun phrase.
  prompts = tuple(tuple(t.format(a=_with_article(name)) for t in shapes_render.ONE_OBJECT_TEMPLATES)
                  for name in names)

  def read_split(split, image_size, data_dir=None):
    del data_dir  # drawn, not read: the generator is the dataset
    config = shapes.config_for(image_size=image_size)
    images, labels = [], []
    for scene, _ in shapes.generate_scenes(config, split):
      if len(scene.objects) == 1:
        images.append(shapes_render.render(scene, image_size))
        labels.append(pairs.index(scene.colour_shapes[0]))
    return np.stack(images), np.asarray(labels, np.int32)
  return Task("shapes", names, prompts, read_split)


def _digits_task(name):
  from mmjax.input_pipeline import digits  # pylint: disable=g-import-not-at-top
  prompts = tuple(tuple(t.format(word=word, number=number) for t in digits.CAPTION_TEMPLATES)
                  for number, word in enumerate(digits.DIGIT_WORDS))

  def read_split(split, image_size, data_dir=None):
    from mmjax.input_pipeline import preprocess  # pylint: disable=g-import-not-at-top
    builder = digits.BUILDERS[name](data_dir=data_dir)
    builder.download_and_prepare()
    if split not in builder.info.splits:
      raise ConfigError(f"split {split!r}: dataset {name!r} has splits {sorted(builder.info.splits)}")
    dataset = builder.as_dataset(split=split).map(
        lambda x: (preprocess.resize_and_crop(x["image"], image_size), x["label"]))
    images, labels = zip(*dataset.batch(1024).as_numpy_iterator())
    return np.concatenate(images), np.concatenate(labels).astype(np.int32)
  return Task(name, digits.DIGIT_WORDS, prompts, read_split)


TASKS = {"shapes": _shapes_task, "digits": lambda: _digits_task("digits"),
         "mnist": lambda: _digits_task("mnist")}


def get_task(name):
  if name not in TASKS:
    raise ConfigError(f"zero-shot dataset {name!r}: expected one of {sorted(TASKS)}")
  return TASKS[name]()


def labelled_split(task, split, image_size, data_dir=None):
  """(uint8 images [N, S, S, 3], int labels [N]) of a task's split; DataError when it is empty."""
  images, labels = task.read_split(split, image_size, data_dir)
  if not len(labels):
    raise DataError(f"zero-shot dataset {task.name!r} split {split!r} holds no labelled images")
  return images, labels


# ----------------------------------------------------------------------------- the classifier

class Encoder:
  """A CLIP's two towers, jitted over a mesh; numpy in, unit-norm f32 numpy embeddings out.

  Each call feeds the *whole* host array (identical on every process) in global batches of
  `batch_size` rows, the last one padded, so it runs the same collectives on every host.
  """

  def __init__(self, model, params=None, mesh=None, rules=common.DEFAULT_LOGICAL_AXIS_RULES, batch_size=256):
    self.model, self.rules = model, rules
    self.params = params  # may be replaced between calls (the trainer's EMA params): no recompilation
    self.mesh = mesh if mesh is not None else sharding.create_mesh(common.mesh_config(data=-1))
    shards = int(np.prod([self.mesh.shape[a] for a in sharding.batch_axes(rules)]))
    self.batch_size = max(shards, batch_size // shards * shards)
    self._sharding = sharding.batch_sharding(self.mesh, rules)

    def images_fn(p, x):
      return clip.l2_normalize(model.apply({"params": p}, x, method=clip.CLIP.encode_image))

    def texts_fn(p, t):
      return clip.l2_normalize(model.apply({"params": p}, t, method=clip.CLIP.encode_text))
    self._images, self._texts = jax.jit(images_fn), jax.jit(texts_fn)

  def _run(self, fn, array):
    rows = len(array)
    outputs = []
    for start in range(0, rows, self.batch_size):
      chunk = array[start:start + self.batch_size]
      if len(chunk) < self.batch_size:  # pad the last batch; the padded rows are dropped below
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - len(chunk), axis=0)])
      global_chunk = jax.make_array_from_callback(chunk.shape, self._sharding, lambda index: chunk[index])
      with sharding.mesh_and_rules(self.mesh, self.rules):
        out = fn(self.params, global_chunk)
      outputs.append(np.asarray(multihost_utils.process_allgather(out, tiled=True)))
    return np.concatenate(outputs)[:rows]

  def images(self, pixels):
    """float32 model-ready images [N, S, S, 3] → [N, embed_dim]."""
    return self._run(self._images, np.asarray(pixels, np.float32))

  def texts(self, tokens):
    """int32 token rows [N, L] → [N, embed_dim]."""
    return self._run(self._texts, np.asarray(tokens, np.int32))


def class_embeddings(encode_texts, tokenize, prompts):
  """[C, D] unit rows: per class, the renormalised mean of its prompts' normalised text embeddings.

  encode_texts: int tokens [N, L] → unit-norm [N, D]; tokenize: list of str → tokens [N, L];
  prompts: per class, a sequence of prompt strings (all classes may differ in count).
  """
  flat = [p for class_prompts in prompts for p in class_prompts]
  if not flat or any(not class_prompts for class_prompts in prompts):
    raise ConfigError("zero-shot prompts: every class needs at least one prompt")
  embeddings = np.asarray(encode_texts(tokenize(flat)), np.float32)
  embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)  # already unit-norm from the Encoder
  classes, start = [], 0
  for class_prompts in prompts:
    mean = embeddings[start:start + len(class_prompts)].mean(axis=0)
    classes.append(mean / np.linalg.norm(mean))
    start += len(class_prompts)
  return np.stack(classes)


def classify(image_embeddings, classifier):
  """logits [N, C] = 100 · cos(image, class)."""
  images = np.asarray(image_embeddings, np.float32)
  images = images / np.linalg.norm(images, axis=1, keepdims=True)
  return LOGIT_SCALE * images @ np.asarray(classifier, np.float32).T


def top_k_accuracy(logits, labels, ks=(1, 5)):
  """{"top1": …, "top5": …}: fraction of rows whose label is among the k largest logits."""
  order = np.argsort(-np.asarray(logits), axis=1, kind="stable")
  labels = np.asarray(labels)[:, None]
  return {f"top{k}": float(np.mean(np.any(order[:, :k] == labels, axis=1))) for k in ks}


class ZeroShotEval:
  """A task's labelled split and tokenized prompts, read once; call with an Encoder for accuracies."""

  def __init__(self, task_name, split, tokenizer, image_size, text_length, data_dir=None):
    from mmjax.input_pipeline import preprocess  # pylint: disable=g-import-not-at-top
    self.task, self.split = get_task(task_name), split
    images, self.labels = labelled_split(self.task, split, image_size, data_dir)
    self.pixels = np.asarray(preprocess.map_pixels(images, "clip"))
    self.tokenize = lambda texts: tokenizer.tokenize(texts, "clip", text_length)

  def __call__(self, encoder):
    """{"top1", "top5", "examples", "classes"} for the encoder's current params."""
    classifier = class_embeddings(encoder.texts, self.tokenize, self.task.prompts)
    logits = classify(encoder.images(self.pixels), classifier)
    return {**top_k_accuracy(logits, self.labels), "examples": len(self.labels),
            "classes": len(self.task.class_names)}


def evaluate(encoder, tokenizer, task_name, split, *, data_dir=None, image_size=None, text_length=None):
  """Zero-shot accuracy of `encoder` on a task's split at the model's image size and context length."""
  model = encoder.model
  return ZeroShotEval(task_name, split, tokenizer, image_size or model.image_size,
                      text_length or model.context_length, data_dir)(encoder)


# ----------------------------------------------------------------------------- exported models

def save_tokenizer(export_dir, tokenizer):
  """Records the tokenizer next to an exported CLIP (a sentencepiece model is copied in)."""
  from mmjax.input_pipeline import clip_bpe  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return
  if isinstance(tokenizer, clip_bpe.ClipTokenizer):
    record = {"kind": "openai_bpe", "vocab_size": tokenizer.vocab_size}
  else:
    shutil.copyfile(tokenizer.model_path, os.path.join(export_dir, SENTENCEPIECE_FILE))
    record = {"kind": "sentencepiece", "model": SENTENCEPIECE_FILE, "vocab_size": tokenizer.vocab_size}
  with open(os.path.join(export_dir, TOKENIZER_JSON), "w") as f:
    json.dump(record, f, indent=1)


def load_tokenizer(export_dir, model_config, override=None):
  """The exported model's tokenizer: `override` (a sentencepiece .model, or OpenAI's merges file), else
  tokenizer.json, else OpenAI's BPE for converted OpenAI weights; DataError when none applies."""
  from mmjax.input_pipeline import clip_bpe, tokenizer as sentencepiece  # pylint: disable=g-import-not-at-top
  if override:
    if override.endswith(".model"):
      return sentencepiece.Tokenizer(override)
    return clip_bpe.ClipTokenizer(override)
  path = os.path.join(export_dir, TOKENIZER_JSON)
  if os.path.exists(path):
    with open(path) as f:
      record = json.load(f)
    if record.get("kind") == "sentencepiece":
      return sentencepiece.Tokenizer(os.path.join(export_dir, record["model"]))
    if record.get("kind") == "openai_bpe":
      return clip_bpe.ClipTokenizer()
    raise DataError(f"{path}: unknown tokenizer kind {record.get('kind')!r}")
  if model_config.get("source") == "openai-clip" or model_config.get("vocab_size") == clip_bpe.VOCAB_SIZE:
    return clip_bpe.ClipTokenizer()
  raise DataError(f"{export_dir}: no {TOKENIZER_JSON} and not OpenAI weights; give --tokenizer "
                  "(a sentencepiece .model or OpenAI's bpe_simple_vocab_16e6.txt.gz)")


def load(checkpoint, tokenizer_path=None, mesh=None, batch_size=256, dtype=None):
  """(Encoder, tokenizer) for an exported CLIP directory; `dtype` overrides the compute dtype."""
  params, model_config = checkpoint_lib.load_model(checkpoint, kind="clip")
  overrides = {"dtype": dtype} if dtype else {}
  model = clip.from_model_config(model_config, **overrides)
  tokenizer = load_tokenizer(checkpoint, model_config, tokenizer_path)
  if tokenizer.vocab_size > model.vocab_size:
    raise DataError(f"{checkpoint}: the tokenizer has {tokenizer.vocab_size} ids but the model's text "
                    f"embedding only {model.vocab_size} rows")
  return Encoder(model, params, mesh=mesh, batch_size=batch_size), tokenizer


# ----------------------------------------------------------------------------- CLI

def define_flags():
  """Defined only when run as a program, so importing this module (the trainer does) defines no flags."""
  flags.DEFINE_string("checkpoint", None, "Exported CLIP directory (params/ + model.json).")
  flags.DEFINE_enum("dataset", "shapes", sorted(TASKS), "Zero-shot task.")
  flags.DEFINE_string("split", "test", "Split to classify.")
  flags.DEFINE_string("data_dir", None, "TFDS data dir for digits/mnist (default: TFDS's own).")
  flags.DEFINE_string("tokenizer", None, "Override the tokenizer: a sentencepiece .model, or OpenAI's "
                      "bpe_simple_vocab_16e6.txt.gz.")
  flags.DEFINE_integer("batch_size", 256, "Images (or prompts) per forward pass.")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Override the model's compute dtype.")
  flags.mark_flags_as_required(["checkpoint"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  args = flags.FLAGS
  start = time.perf_counter()
  try:
    encoder, tokenizer = load(args.checkpoint, args.tokenizer, batch_size=args.batch_size, dtype=args.dtype)
    results = evaluate(encoder, tokenizer, args.dataset, args.split, data_dir=args.data_dir)
  except (ConfigError, DataError) as e:
    sys.exit(f"mmjax.zeroshot: error: {e}")
  print(f"{args.dataset}/{args.split}: {results['examples']} images, {results['classes']} classes: "
        f"top-1 {100 * results['top1']:.2f}%  top-5 {100 * results['top5']:.2f}% "
        f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
  from mmjax import cli  # pylint: disable=g-import-not-at-top
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
