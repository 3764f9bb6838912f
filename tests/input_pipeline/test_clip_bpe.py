"""OpenAI CLIP's BPE: the same ids as OpenAI's SimpleTokenizer (clip-anytorch), rows, truncation, tf.data."""

import gzip
import importlib.util
import os

import numpy as np
import pytest
import tensorflow as tf

from mmjax.errors import ConfigError, DataError
from mmjax.input_pipeline import clip_bpe, tokenizer

EDGE_CASES = [
    "", "   ", "\t\n", "A photo of a CAT.", "  lots   of\twhite\nspace  ", "it's what they'll've done",
    "café naïve coöperate Ångström", "東京タワー 한국어 русский", "emoji 🐈‍⬛ 🇯🇵 ❤️",
    "mojibake: cafÃ© â€œquotedâ€\ufffd",  # ftfy repairs these
    "AT&amp;T &lt;b&gt;bold&lt;/b&gt; &amp;amp; &quot;q&quot; &#39;s &eacute;",  # unescaped twice
    "numbers 3.14159 and 1,000,000 and ½ Ⅷ", "a <|endoftext|> inside", "<|startoftext|>",
    "soft\u00adhyphen and non\u00a0breaking space and \x1f control", "ß ﬁ İstanbul ǅ",
    "x" * 300, " ".join(["supercalifragilisticexpialidocious"] * 40),
]


def merges_path():
  spec = importlib.util.find_spec("clip")  # clip-anytorch ships OpenAI's merges file
  return os.path.join(list(spec.submodule_search_locations)[0], clip_bpe.MERGES_FILE)


def openai_tokenizer():
  """clip-anytorch's simple_tokenizer.py (OpenAI's code), loaded by path (`import clip` needs torchvision)."""
  path = os.path.join(os.path.dirname(merges_path()), "simple_tokenizer.py")
  spec = importlib.util.spec_from_file_location("clip_simple_tokenizer", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.SimpleTokenizer(merges_path())


@pytest.fixture(scope="module")
def tokenizers():
  return clip_bpe.ClipTokenizer(merges_path()), openai_tokenizer()


def openai_rows(reference, texts, length=77):
  """OpenAI's clip.tokenize(texts, truncate=True) without torch."""
  sot, eot = reference.encoder[clip_bpe.START_OF_TEXT], reference.encoder[clip_bpe.END_OF_TEXT]
  rows = np.zeros((len(texts), length), np.int64)
  for i, text in enumerate(texts):
    ids = [sot] + reference.encode(text) + [eot]
    if len(ids) > length:
      ids = ids[:length]
      ids[-1] = eot
    rows[i, :len(ids)] = ids
  return rows


def test_vocabulary_is_openai_s(tokenizers):
  ours, reference = tokenizers
  assert ours.vocab_size == clip_bpe.VOCAB_SIZE == len(reference.encoder) == 49408
  assert ours._ids == reference.encoder  # pylint: disable=protected-access  (every piece → id)
  assert (ours.bos_id, ours.eos_id, ours.pad_id) == (49406, 49407, 0)
  assert list(clip_bpe.byte_characters().items()) == list(reference.byte_encoder.items())


def test_ids_match_openai_on_cupl_sentences_and_edge_cases(tokenizers):
  ours, reference = tokenizers
  sentences = tokenizer.cupl_sentences()
  sample = sentences[::50]  # ~3,000 real sentences spread over all classes
  assert len(sample) >= 1000
  texts = sample + EDGE_CASES
  mismatches = [t for t in texts if ours.encode(t) != reference.encode(t)]
  assert not mismatches, f"{len(mismatches)} of {len(texts)} differ, e.g. {mismatches[:3]}"
  np.testing.assert_array_equal(ours.tokenize(texts), openai_rows(reference, texts))
  assert ours.encode("") == [] and ours.encode("AT&amp;T") == reference.encode("at&t")
  assert ours.encode("<|endoftext|>") == [ours.eos_id]  # OpenAI maps a literal special token to its id


def test_rows_truncation_and_decode(tokenizers):
  ours, _ = tokenizers
  captions = ["A red circle above a blue square.", "word " * 100, b"bytes work too"]
  before = (ours.num_captions, ours.num_truncated)
  rows = ours.tokenize(captions)
  assert rows.dtype == np.int32 and rows.shape == (3, 77)
  assert (ours.num_captions - before[0], ours.num_truncated - before[1]) == (3, 1)
  assert (rows[:, 0] == ours.bos_id).all()
  assert [len(ours.encode(c)) for c in captions] == [8, 100, 3]
  np.testing.assert_array_equal(rows.argmax(-1), [9, 76, 4])  # the end token is each row's largest id
  assert rows[1, -1] == ours.eos_id and (rows[1, 1:-1] == ours.encode("word")[0]).all()
  assert (rows[0, 10:] == 0).all() and (rows[2, 5:] == 0).all()
  assert ours.decode(rows[0]) == "a red circle above a blue square ."
  assert ours.decode(ours.encode("Don't panic! 東京 100%")) == "don 't panic ! 東京 1 0 0 %"
  short = ours.tokenize(["a b c d e f"], length=5)
  np.testing.assert_array_equal(short, [[ours.bos_id, *ours.encode("a b c"), ours.eos_id]])
  with pytest.raises(DataError, match=r"caption 'word word .*has 102 tokens"):
    ours.tokenize(captions, truncate=False)
  with pytest.raises(ConfigError, match=r"text_layout='dalle'"):
    ours.tokenize(captions, layout="dalle")
  with pytest.raises(ConfigError, match=r"text_length=1"):
    ours.tokenize(captions, length=1)


def test_tf_tokenize_in_a_dataset(tokenizers):
  ours, _ = tokenizers
  captions = ["a photo of a dog", "two cats", "an &quot;old&quot; car", "x"]
  dataset = tf.data.Dataset.from_tensor_slices(captions).batch(2).map(
      lambda c: ours.tf_tokenize(c, "clip", 16))
  assert dataset.element_spec.shape.as_list() == [None, 16]
  rows = np.concatenate(list(dataset.as_numpy_iterator()))
  np.testing.assert_array_equal(rows, ours.tokenize(captions, length=16))


def test_merges_file_errors(tmp_path):
  with pytest.raises(DataError, match=r"missing\.txt\.gz' does not exist"):
    clip_bpe.ClipTokenizer(tmp_path / "missing.txt.gz")
  short = tmp_path / "short.txt.gz"
  short.write_bytes(gzip.compress("#version: 0.2\na b\nc d\n".encode()))
  with pytest.raises(DataError, match=r"expected 48894 lines .* got 3 lines"):
    clip_bpe.ClipTokenizer(short)
  (tmp_path / "junk.gz").write_bytes(b"\x1f\x8bnot gzip")
  with pytest.raises(DataError, match=r"not gzip'd UTF-8"):
    clip_bpe.ClipTokenizer(tmp_path / "junk.gz")
  assert clip_bpe.find_merges_file() == merges_path()
