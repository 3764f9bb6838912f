"""The tokenizer-training command line: default CuPL corpus, --input files, --help."""

import os
import subprocess
import sys

from mmjax.input_pipeline import tokenizer as tokenizer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train_tokenizer(*args):
  return subprocess.run([sys.executable, "-m", "mmjax.tools.train_tokenizer", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120, check=False)


def test_trains_on_the_cupl_captions_by_default(tmp_path):
  result = _train_tokenizer(f"--output={tmp_path}/spm", "--vocab_size=512")
  assert result.returncode == 0, result.stderr
  assert f"Wrote {tmp_path}/spm.model" in result.stdout
  tokenizer = tokenizer_lib.Tokenizer(tmp_path / "spm.model")
  assert tokenizer.vocab_size == 512
  # Trained on the whole CuPL corpus: its most common words are single pieces.
  assert len(tokenizer.encode(["a photo of the"])[0]) == 4
  assert tokenizer.encode(["A Photo OF THE"]) == tokenizer.encode(["a photo of the"])


def test_trains_on_input_files(tmp_path):
  colours, shapes = ("red", "green", "blue", "cyan"), ("circle", "square", "star", "cross")
  corpus = tmp_path / "captions.txt"
  corpus.write_text("".join(f"A {c} {s} next to a {s2}\n" for c in colours for s in shapes for s2 in shapes))
  result = _train_tokenizer(f"--output={tmp_path}/out/spm", "--vocab_size=64", f"--input={corpus}")
  assert result.returncode == 0, result.stderr
  tokenizer = tokenizer_lib.Tokenizer(tmp_path / "out" / "spm.model")
  assert tokenizer.vocab_size == 64
  assert tokenizer.decode(tokenizer.tokenize(["A CYAN Star"], "clip", 16)[0]) == "a cyan star"


def test_help_and_missing_input(tmp_path):
  result = _train_tokenizer("--help")  # absl prints the help and exits with status 1
  for flag in ("--output", "--vocab_size", "--input", "cupl", "lower-casing"):
    assert flag.lower() in result.stdout.lower()
  result = _train_tokenizer(f"--output={tmp_path}/spm", f"--input={tmp_path}/absent.txt")
  assert result.returncode != 0
  assert "absent.txt" in result.stderr and "does not exist" in result.stderr
