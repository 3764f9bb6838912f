r"""Trains mmjax's lower-casing sentencepiece BPE tokenizer.

By default the corpus is the ~150k CuPL ImageNet descriptions that ship inside the clip-benchmark
wheel; --input takes plain text files (one sentence a line) instead. Writes DIR/spm.model and
DIR/spm.vocab for --output=DIR/spm.

  python -m mmjax.tools.train_tokenizer --output=/tmp/tok/spm --vocab_size=16384
  python -m mmjax.tools.train_tokenizer --output=/tmp/tok/spm --vocab_size=1000 --input=a.txt,b.txt
"""

from absl import app, flags

from mmjax.input_pipeline import tokenizer

_OUTPUT = flags.DEFINE_string("output", None, "Output prefix: writes <output>.model and <output>.vocab.",
                              required=True)
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 16384, "Pieces in the model, including pad/unk/bos/eos "
                                   "(16,384 at full size, as in DALL·E).", lower_bound=8)
_INPUT = flags.DEFINE_list("input", [], "Text files, one sentence a line (comma-separated). Empty: the "
                           "CuPL captions from the installed clip-benchmark package.")
_CHARACTER_COVERAGE = flags.DEFINE_float("character_coverage", 0.9995, "Fraction of characters the "
                                         "model covers; the rarest others become unk.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  corpus = ",".join(_INPUT.value) if _INPUT.value else "cupl"  # a string of files, or the cupl corpus
  path = tokenizer.train_tokenizer(corpus, _OUTPUT.value, _VOCAB_SIZE.value,
                                   character_coverage=_CHARACTER_COVERAGE.value)
  print(f"Wrote {path}")


if __name__ == "__main__":
  app.run(main)
