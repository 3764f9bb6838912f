"""OpenAI CLIP's byte-level BPE tokenizer: the ids OpenAI's (and open_clip's) text towers were trained on.

Vocabulary (49,408 ids), built from OpenAI's merges file `bpe_simple_vocab_16e6.txt.gz` (it ships
with OpenAI's `clip` package, `clip-anytorch` and `open_clip`; give its path):
    0 … 255        the 256 bytes, each mapped to a printable unicode character
    256 … 511      the same characters with the end-of-word marker `</w>`
    512 … 49405    one id per merge, in merge order (the first 48,894 merges of the file)
    49406, 49407   <|startoftext|>, <|endoftext|>
Text is cleaned as OpenAI does: ftfy.fix_text, HTML entities unescaped (twice), runs of whitespace
collapsed to one space, stripped, lower-cased; then split into words/numbers/punctuation runs by
OpenAI's regex, each piece's UTF-8 bytes mapped to characters and merged by rank.

Rows (`ClipTokenizer.tokenize`): int32 [N, length] = <|startoftext|>, ids, <|endoftext|>, then 0s.
<|endoftext|> is the largest id, so `tokens.argmax(-1)` finds it (what the CLIP model reads). A
caption longer than length − 2 ids keeps its first length − 2 ids and still ends in
<|endoftext|> (OpenAI's `clip.tokenize(..., truncate=True)`); truncations are counted and logged.
`truncate=False` raises DataError instead, as OpenAI's default does.
"""

import functools
import gzip
import html
import importlib.util
import os
import threading

import ftfy
import numpy as np
import regex
import tensorflow as tf
from absl import logging

from mmjax.errors import ConfigError, DataError

MERGES_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # OpenAI keeps the first 48,894 merges of the file
VOCAB_SIZE = 2 * 256 + NUM_MERGES + 2  # 49,408
CONTEXT_LENGTH = 77
START_OF_TEXT, END_OF_TEXT = "<|startoftext|>", "<|endoftext|>"
PAD_ID = 0
END_OF_WORD = "</w>"

# OpenAI's pre-tokenizer: the special tokens, English contractions, letter runs, single digits,
# runs of other non-space characters. \p{…} needs the `regex` package.
_PIECES = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE)
_WHITESPACE = regex.compile(r"\s+")


def byte_characters():
  """The 256 bytes → printable characters, in vocabulary order (byte ids 0 … 255).

  Printable Latin-1 bytes ('!'…'~', '¡'…'¬', '®'…'ÿ') stand for themselves and come first; the
  other 68 bytes (controls, space, soft hyphen) get the characters U+0100 onward, in byte order.
  """
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  others = [b for b in range(256) if b not in set(printable)]
  return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def clean_text(text):
  """OpenAI's basic_clean + whitespace_clean + lower-casing."""
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return _WHITESPACE.sub(" ", text).strip().lower()


def find_merges_file():
  """`bpe_simple_vocab_16e6.txt.gz` inside an installed OpenAI `clip`/clip-anytorch or `open_clip`."""
  for package in ("clip", "open_clip"):
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
      path = os.path.join(list(spec.submodule_search_locations)[0], MERGES_FILE)
      if os.path.exists(path):
        return path
  raise DataError(f"no {MERGES_FILE} found: give its path (it ships with OpenAI's clip package, "
                  "clip-anytorch and open_clip_torch)")


def read_merges(path):
  """The first NUM_MERGES (left, right) pairs of a merges file (gzip or plain text; local or gs://)."""
  path = str(path)
  if not tf.io.gfile.exists(path):
    raise DataError(f"CLIP BPE merges file {path!r} does not exist")
  with tf.io.gfile.GFile(path, "rb") as f:
    data = f.read()
  try:
    text = (gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data).decode("utf-8")
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise DataError(f"CLIP BPE merges file {path!r} is not gzip'd UTF-8 text ({e})") from e
  lines = text.split("\n")[1:NUM_MERGES + 1]  # line 0 is a version header
  merges = [tuple(line.split()) for line in lines]
  bad = [i + 2 for i, merge in enumerate(merges) if len(merge) != 2]
  if len(merges) != NUM_MERGES or bad:
    raise DataError(f"CLIP BPE merges file {path!r}: expected {NUM_MERGES} lines of two symbols after the "
                    f"header, got {len(merges)} lines" + (f", malformed at line(s) {bad[:5]}" if bad else ""))
  return merges


class ClipTokenizer:
  """OpenAI CLIP's BPE; thread-safe (tf.data may call it from several threads)."""

  def __init__(self, merges_path=None, cache_size=1 << 16):
    self.merges_path = str(merges_path) if merges_path else find_merges_file()
    merges = read_merges(self.merges_path)
    characters = list(byte_characters().values())
    vocab = [*characters, *(c + END_OF_WORD for c in characters), *("".join(m) for m in merges),
             START_OF_TEXT, END_OF_TEXT]
    # A later duplicate wins, as in OpenAI's dict(zip(vocab, range(len(vocab)))).
    self._ids = {piece: i for i, piece in enumerate(vocab)}
    self._pieces = vocab
    self._ranks = {merge: rank for rank, merge in enumerate(merges)}
    self._byte_characters = byte_characters()
    self._character_bytes = {c: b for b, c in self._byte_characters.items()}
    self._word_ids = functools.lru_cache(maxsize=cache_size)(self._merge_word)
    self._lock = threading.Lock()
    self.num_captions = 0
    self.num_truncated = 0

  @property
  def vocab_size(self):
    return len(self._pieces)

  @property
  def bos_id(self):
    return self._ids[START_OF_TEXT]

  @property
  def eos_id(self):
    return self._ids[END_OF_TEXT]

  @property
  def pad_id(self):
    return PAD_ID

  def _merge_word(self, word):
    """Ids of one pre-tokenized piece: repeatedly merge its lowest-ranked adjacent pair."""
    if word in (START_OF_TEXT, END_OF_TEXT):
      return (self._ids[word],)  # a literal special token in the text maps to its id, as OpenAI's does
    symbols = [self._byte_characters[b] for b in word.encode("utf-8")]
    symbols[-1] += END_OF_WORD
    while len(symbols) > 1:
      ranks = [self._ranks.get(pair, NUM_MERGES) for pair in zip(symbols, symbols[1:])]
      best = min(ranks)
      if best == NUM_MERGES:
        break
      first, second = symbols[ranks.index(best)], symbols[ranks.index(best) + 1]
      merged, i = [], 0
      while i < len(symbols):  # every non-overlapping occurrence, left to right
        if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
          merged.append(first + second)
          i += 2
        else:
          merged.append(symbols[i])
          i += 1
      symbols = merged
    return tuple(self._ids[s] for s in symbols)

  def encode(self, text):
    """BPE ids of one caption (str or UTF-8 bytes), without start/end tokens."""
    if isinstance(text, bytes):
      text = text.decode("utf-8")
    ids = []
    for word in _PIECES.findall(clean_text(text)):
      ids.extend(self._word_ids(word))
    return ids

  def decode(self, ids):
    """Text of `encode`'s ids or of a token row: everything from the first end token on is dropped
    (the zero padding is id 0, the byte '!', so it cannot be told apart otherwise), start tokens too."""
    ids = np.asarray(ids).reshape(-1).tolist()
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    data = bytearray()
    for i in ids:
      if i == self.bos_id:
        continue
      piece = self._pieces[i]
      word_end = piece.endswith(END_OF_WORD)
      data.extend(self._character_bytes[c] for c in (piece[:-len(END_OF_WORD)] if word_end else piece))
      if word_end:
        data.extend(b" ")
    return data.decode("utf-8", errors="replace").strip()

  def tokenize(self, captions, layout="clip", length=CONTEXT_LENGTH, truncate=True):
    """int32 [N, length] rows for a batch (list/array of str or bytes; a str alone is one caption).

    `layout` exists so this tokenizer drops in where mmjax's sentencepiece `Tokenizer` is used; only
    "clip" (start, ids, end, zero padding) is meaningful for OpenAI's BPE.
    """
    if layout != "clip":
      raise ConfigError(f"config.data.text_layout={layout!r}: OpenAI's CLIP BPE only makes 'clip' rows")
    if length < 2:
      raise ConfigError(f"config.data.text_length={length}: a CLIP row needs room for start and end tokens")
    if isinstance(captions, (str, bytes)):
      captions = [captions]
    captions = list(np.asarray(captions, dtype=object).ravel())
    tokens = np.zeros((len(captions), length), np.int32)
    truncated = 0
    for row, caption in enumerate(captions):
      ids = [self.bos_id, *self.encode(caption), self.eos_id]
      if len(ids) > length:
        if not truncate:
          raise DataError(f"caption {_preview(caption)} has {len(ids)} tokens with start and end, more than "
                          f"the context length {length}")
        ids = ids[:length - 1] + [self.eos_id]
        truncated += 1
      tokens[row, :len(ids)] = ids
    self._count(len(captions), truncated, length)
    return tokens

  def tf_tokenize(self, captions, layout="clip", length=CONTEXT_LENGTH):
    """The same rows inside a tf graph: a [N] string tensor → int32 [N, length], one Python call per batch."""
    self.tokenize([], layout, length)  # bad settings fail here, not later inside tf.data
    # stateful=False: the only side effect is the truncation count, and a stateless op lets tf.data
    # checkpoint the pipeline around it.
    tokens = tf.numpy_function(lambda c: self.tokenize(c, layout, length), [captions], tf.int32,
                               stateful=False, name="clip_bpe_tokenize")
    tokens.set_shape([captions.shape[0], length])
    return tokens

  def _count(self, num_captions, num_truncated, length):
    with self._lock:
      self.num_captions += num_captions
      self.num_truncated += num_truncated
      if num_truncated:
        logging.log_every_n_seconds(logging.WARNING, "Truncated %d of %d captions so far to %d CLIP tokens",
                                    60, self.num_truncated, self.num_captions, length)


def _preview(caption, limit=60):
  text = caption.decode("utf-8", "replace") if isinstance(caption, bytes) else str(caption)
  return repr(text if len(text) <= limit else text[:limit] + "…")
