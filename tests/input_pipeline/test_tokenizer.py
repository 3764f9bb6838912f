"""Sentencepiece BPE: training on the real CuPL captions, lower-casing, the dalle/clip layouts in tf.data."""

import importlib.util
import pathlib

import numpy as np
import pytest
import tensorflow as tf

from mmjax.errors import ConfigError, DataError
from mmjax.input_pipeline import tokenizer as tokenizer_lib

VOCAB_SIZE = 300
LONG_CAPTION = "a very long caption about a small red circle that sits to the left of a large blue square"


@pytest.fixture(scope="module")
def corpus():
  return tokenizer_lib.cupl_sentences()[:4000]


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
  prefix = tmp_path_factory.mktemp("tok") / "spm"
  return tokenizer_lib.Tokenizer(tokenizer_lib.train_tokenizer(corpus, str(prefix), VOCAB_SIZE))


def test_cupl_corpus_is_the_real_caption_text():
  sentences = tokenizer_lib.cupl_sentences()
  assert len(sentences) > 100_000
  assert all(s and s == s.strip() for s in sentences)
  assert any("tench" in s for s in sentences)


def test_cupl_without_clip_benchmark_fails_clearly(monkeypatch):
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "clip_benchmark" else real_find_spec(name, *a))
  with pytest.raises(DataError, match="clip-benchmark"):
    tokenizer_lib.train_tokenizer("cupl", "/tmp/unused_prefix", 256)


def test_training_writes_model_and_vocab_with_reserved_ids(tokenizer):
  assert tokenizer.vocab_size == VOCAB_SIZE
  assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 2, VOCAB_SIZE - 1)
  vocab = pathlib.Path(tokenizer.model_path).with_suffix(".vocab").read_text().splitlines()
  assert len(vocab) == VOCAB_SIZE
  assert [line.split("\t")[0] for line in vocab[:3]] == ["<pad>", "<unk>", "<s>"]
  assert vocab[-1].split("\t")[0] == "</s>"


def test_training_is_deterministic(corpus, tokenizer, tmp_path):
  again = tokenizer_lib.train_tokenizer(corpus, str(tmp_path / "other_name"), VOCAB_SIZE)
  assert pathlib.Path(again).read_bytes() == pathlib.Path(tokenizer.model_path).read_bytes()


def test_encoding_lower_cases(tokenizer):
  upper, lower = tokenizer.encode(["A RED Circle", "a red circle"])
  assert upper == lower and len(upper) > 0
  assert np.array_equal(*tokenizer.tokenize(["A RED Circle", "a red circle"], "clip", 16))
  assert tokenizer.decode(tokenizer.tokenize(["A RED Circle"], "dalle", 16)[0]) == "a red circle"


def test_dalle_layout_pads_each_position_with_its_own_token(tokenizer):
  ids = tokenizer.encode(["a red circle"])[0]
  length = len(ids) + 5
  before = tokenizer.num_truncated
  row = tokenizer.tokenize([b"a red circle"], "dalle", length)[0]
  assert row.dtype == np.int32
  assert row[:len(ids)].tolist() == ids
  assert row[len(ids):].tolist() == [VOCAB_SIZE + i for i in range(len(ids), length)]
  assert row.max() < tokenizer_lib.text_embedding_rows("dalle", VOCAB_SIZE, length) == VOCAB_SIZE + length
  assert tokenizer.num_truncated == before


def test_dalle_layout_truncates_and_counts(tokenizer):
  ids = tokenizer.encode([LONG_CAPTION])[0]
  assert len(ids) > 8
  before = tokenizer.num_truncated
  rows = tokenizer.tokenize([LONG_CAPTION, "a", LONG_CAPTION], "dalle", 8)
  assert rows[0].tolist() == ids[:8] == rows[2].tolist()
  assert tokenizer.num_truncated == before + 2


def test_clip_layout_bos_ids_eos_zeros(tokenizer):
  ids = tokenizer.encode(["a red circle"])[0]
  rows = tokenizer.tokenize(["a red circle", "", LONG_CAPTION], "clip", 12)
  assert rows[0].tolist() == [2, *ids, VOCAB_SIZE - 1] + [0] * (12 - len(ids) - 2)
  assert rows[1].tolist() == [2, VOCAB_SIZE - 1] + [0] * 10
  long_ids = tokenizer.encode([LONG_CAPTION])[0]
  assert rows[2].tolist() == [2, *long_ids[:10], VOCAB_SIZE - 1]
  assert tokenizer_lib.eot_index(rows).tolist() == [len(ids) + 1, 1, 11]
  assert rows.max() < tokenizer_lib.text_embedding_rows("clip", VOCAB_SIZE, 12)


def test_tf_tokenize_makes_one_call_per_batch(tokenizer, monkeypatch):
  captions = [f"a photo of {n} red circles" for n in range(10)]
  expected = tokenizer.tokenize(captions, "dalle", 10)
  calls = []
  real_tokenize = tokenizer.tokenize
  monkeypatch.setattr(tokenizer, "tokenize", lambda *args: calls.append(1) or real_tokenize(*args))
  dataset = tf.data.Dataset.from_tensor_slices(captions).batch(4).map(
      lambda batch: tokenizer.tf_tokenize(batch, "dalle", 10))
  assert dataset.element_spec.shape.as_list() == [None, 10]
  rows = np.concatenate([batch.numpy() for batch in dataset])
  assert np.array_equal(rows, expected)
  assert len(calls) == 3


def test_bad_inputs_name_what_is_wrong(tokenizer, tmp_path):
  with pytest.raises(ConfigError, match="text_layout"):
    tokenizer.tokenize(["a"], "gpt", 8)
  with pytest.raises(ConfigError, match="text_length=2"):
    tokenizer.tokenize(["a"], "clip", 2)
  with pytest.raises(DataError, match="nope.model"):
    tokenizer_lib.Tokenizer(tmp_path / "nope.model")
  with pytest.raises(DataError, match="missing.txt"):
    tokenizer_lib.train_tokenizer(str(tmp_path / "missing.txt"), str(tmp_path / "x"), 64)
  with pytest.raises(DataError, match="5000-piece"):
    tokenizer_lib.train_tokenizer(["a red circle", "a blue square"], str(tmp_path / "x"), 5000)


def test_corpus_from_files_and_sentences(tmp_path):
  first, second = tmp_path / "a.txt", tmp_path / "b.txt"
  first.write_text("a red circle\n\n  a blue square \n")
  second.write_text("a green star\n")
  assert tokenizer_lib.read_corpus(f"{first},{second}") == ["a red circle", "a blue square", "a green star"]
  assert tokenizer_lib.read_corpus(["a cyan cross ", second]) == ["a cyan cross", "a green star"]
  with pytest.raises(DataError, match="no non-empty"):
    tokenizer_lib.read_corpus(["", "  "])
