"""Lower-casing sentencepiece BPE: training, and the two fixed-length text layouts the models read.

Ids of a model trained here: pad = 0, unk = 1, bos = 2, eos = vocab_size - 1 (the largest id, so
that, as in OpenAI's CLIP, the end-of-text position of a "clip" row is `tokens.argmax(-1)`); BPE
pieces fill 3 .. vocab_size - 2. Lower-casing lives in the model's normalizer ("nmt_nfkc_cf":
NFKC + case folding), so every encode path lower-cases, in Python and inside tf.data alike.

Layouts (`Tokenizer.tokenize`, int32 rows of a fixed `length`):
  "dalle": the caption's ids, truncated to `length`, then *per-position padding*: an empty
           position i holds `vocab_size + i`, so a text embedding table with
           `text_embedding_rows("dalle", vocab_size, length)` = vocab_size + length rows gives every
           position its own learned pad token, as in DALL·E. No bos/eos.
  "clip":  bos, ids, eos, then pad_id (0). A caption too long for `length` keeps its first
           length - 2 ids and still ends in eos; `eot_index(tokens)` gives the eos position.
Truncated captions are counted (`num_truncated`) and the count is logged.
"""

import importlib.util
import io
import itertools
import json
import os
import threading

import numpy as np
import sentencepiece as spm
import tensorflow as tf
from absl import logging

from mmjax.errors import ConfigError, DataError

LAYOUTS = ("dalle", "clip")
PAD_ID, UNK_ID, BOS_ID = 0, 1, 2
NORMALIZATION_RULE = "nmt_nfkc_cf"


def text_embedding_rows(layout, vocab_size, text_length):
  """Rows the text embedding table needs for token rows of this layout."""
  _check_layout(layout)
  return vocab_size + text_length if layout == "dalle" else vocab_size


def eot_index(tokens):
  """Position of eos in "clip" rows (eos is the largest id); works on numpy and jax arrays."""
  return tokens.argmax(axis=-1)


class Tokenizer:
  """A trained sentencepiece model plus the fixed-length layouts; safe to call from tf.data threads."""

  def __init__(self, model_path):
    self.model_path = str(model_path)
    if not tf.io.gfile.exists(self.model_path):
      raise DataError(f"tokenizer model {self.model_path!r} does not exist")
    with tf.io.gfile.GFile(self.model_path, "rb") as f:
      self._sp = spm.SentencePieceProcessor(model_proto=f.read())
    ids = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
    if ids != (PAD_ID, UNK_ID, BOS_ID, self.vocab_size - 1):
      raise DataError(f"tokenizer model {self.model_path!r}: (pad, unk, bos, eos) ids are {ids}, expected "
                      f"{(PAD_ID, UNK_ID, BOS_ID, self.vocab_size - 1)} "
                      "(train it with mmjax.tools.train_tokenizer)")
    self._lock = threading.Lock()
    self.num_captions = 0
    self.num_truncated = 0

  @property
  def vocab_size(self):
    return self._sp.vocab_size()

  @property
  def pad_id(self):
    return PAD_ID

  @property
  def bos_id(self):
    return BOS_ID

  @property
  def eos_id(self):
    return self.vocab_size - 1

  def encode(self, texts):
    """Variable-length ids (no bos/eos) for a list of str or bytes."""
    return self._sp.encode(list(texts))

  def decode(self, tokens):
    """Text of one token row of either layout: pads, bos and eos are dropped."""
    ids = [int(t) for t in np.asarray(tokens).reshape(-1)]
    return self._sp.decode([t for t in ids if BOS_ID < t < self.eos_id or t == UNK_ID])

  def tokenize(self, captions, layout, length):
    """int32 [len(captions), length] rows in `layout` for a batch of str/bytes captions."""
    capacity = _text_capacity(layout, length)
    texts = [c.decode("utf-8") if isinstance(c, bytes) else c for c in np.asarray(captions).ravel()]
    ids = self._sp.encode(texts)
    rows = len(ids)
    lengths = np.fromiter(map(len, ids), np.int64, rows)
    flat = np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(lengths.sum()))
    kept = np.minimum(lengths, capacity)
    # Each row's first `kept` ids in one vectorised copy: a mask over the flat concatenation and a
    # mask over the output grid pick the same ids in the same row-major order.
    position_in_row = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    kept_ids = flat[position_in_row < capacity]
    valid = np.arange(capacity)[None, :] < kept[:, None]
    if layout == "dalle":
      tokens = np.tile(np.arange(self.vocab_size, self.vocab_size + length, dtype=np.int32), (rows, 1))
      tokens[valid] = kept_ids
    else:
      tokens = np.zeros((rows, length), np.int32)
      tokens[:, 0] = BOS_ID
      tokens[:, 1:-1][valid] = kept_ids
      tokens[np.arange(rows), kept + 1] = self.eos_id
    self._count(rows, int((lengths > capacity).sum()), length)
    return tokens

  def tf_tokenize(self, captions, layout, length):
    """The same rows inside a tf graph: one sentencepiece call per batch of captions."""
    _text_capacity(layout, length)  # bad settings fail here, not later inside tf.data
    # stateful=False: the only side effect is the truncation count, and a stateless op lets
    # tf.data checkpoint the pipeline around it.
    tokens = tf.numpy_function(lambda c: self.tokenize(c, layout, length), [captions], tf.int32,
                               stateful=False, name="sentencepiece_tokenize")
    tokens.set_shape([captions.shape[0], length])
    return tokens

  def _count(self, num_captions, num_truncated, length):
    with self._lock:
      self.num_captions += num_captions
      self.num_truncated += num_truncated
      if num_truncated:
        logging.log_every_n_seconds(logging.WARNING, "Truncated %d of %d captions so far to %d text tokens",
                                    60, self.num_truncated, self.num_captions, length)


def _check_layout(layout):
  if layout not in LAYOUTS:
    raise ConfigError(f"config.data.text_layout={layout!r}: expected one of {LAYOUTS}")


def _text_capacity(layout, length):
  """Caption ids that fit in a row of `length`."""
  _check_layout(layout)
  capacity = length if layout == "dalle" else length - 2
  if capacity < 1:
    raise ConfigError(f"config.data.text_length={length} leaves no room for text in layout {layout!r}")
  return capacity


def cupl_sentences():
  """The CuPL ImageNet descriptions shipped in the clip-benchmark wheel (~150k sentences)."""
  spec = importlib.util.find_spec("clip_benchmark")  # locates the package without importing it
  if spec is None or not spec.submodule_search_locations:
    raise DataError("corpus 'cupl' needs the clip-benchmark package (pip install --no-deps clip-benchmark), "
                    "which ships clip_benchmark/datasets/cupl_prompts.json")
  path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "cupl_prompts.json")
  if not os.path.exists(path):
    raise DataError(f"corpus 'cupl': {path!r} is missing from the installed clip-benchmark")
  with open(path, encoding="utf-8") as f:
    prompts = json.load(f)  # {"imagenet1k": {class name: [sentence, ...]}}
  return [s.strip() for per_class in prompts.values() for sentences in per_class.values()
          for s in sentences if s.strip()]


def read_corpus(corpus):
  """Sentences of a corpus: "cupl"; a comma-separated string of text files (one sentence a line); or
  a sequence whose `os.PathLike` items are such files and whose `str` items are sentences."""
  if isinstance(corpus, str):
    if corpus == "cupl":
      return cupl_sentences()
    if corpus == "dataset":
      raise ConfigError("config.tokenizer.corpus='dataset': pass the dataset's captions to train_tokenizer "
                        "(mmjax.input_pipeline.datasets.captions)")
    items = [_File(path.strip()) for path in corpus.split(",") if path.strip()]
  else:
    items = list(corpus)
  sentences = []
  for item in items:
    if isinstance(item, os.PathLike):
      sentences.extend(_read_lines(os.fspath(item)))
    else:
      sentences.append(str(item).strip())
  sentences = [s for s in sentences if s]
  if not sentences:
    raise DataError(f"tokenizer corpus {corpus!r} has no non-empty sentences")
  return sentences


class _File(str, os.PathLike):
  """A path kept as a plain string (pathlib would turn gs://bucket into gs:/bucket)."""

  def __fspath__(self):
    return str(self)


def _read_lines(path):
  if not tf.io.gfile.exists(path):
    raise DataError(f"tokenizer corpus file {path!r} does not exist")
  with tf.io.gfile.GFile(path, "r") as f:
    return [line.strip() for line in f]


def train_tokenizer(sentences_or_files, output_prefix, vocab_size, *, character_coverage=0.9995,
                    num_threads=4):
  """Trains the lower-casing BPE model; writes <output_prefix>.model and .vocab; returns the .model path.

  Deterministic: the same sentences, vocab_size, character_coverage and num_threads give the same
  model bytes (the bytes come back from sentencepiece in memory, so no output path is recorded in them).
  """
  sentences = read_corpus(sentences_or_files)
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        normalization_rule_name=NORMALIZATION_RULE, character_coverage=character_coverage,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=vocab_size - 1,
        input_sentence_size=0, shuffle_input_sentence=False, num_threads=num_threads, minloglevel=1)
  except RuntimeError as e:
    raise DataError(f"sentencepiece cannot train a {vocab_size}-piece BPE model on {len(sentences)} "
                    f"sentences: {e}") from e
  parent = os.path.dirname(str(output_prefix))
  if parent:
    tf.io.gfile.makedirs(parent)
  model_path = f"{output_prefix}.model"
  with tf.io.gfile.GFile(model_path, "wb") as f:
    f.write(model.getvalue())
  processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
  with tf.io.gfile.GFile(f"{output_prefix}.vocab", "w") as f:
    f.write("".join(f"{processor.id_to_piece(i)}\t{processor.get_score(i)}\n" for i in range(vocab_size)))
  logging.info("Trained a %d-piece BPE tokenizer on %d sentences -> %s", vocab_size, len(sentences),
               model_path)
  return model_path
