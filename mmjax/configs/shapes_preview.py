"""Data preview on the embedded shapes set: the job `make demo` runs.

Builds the shapes TFDS dataset, trains the sentencepiece tokenizer, reads one global batch
through the per-host tf.data pipeline onto the device mesh, and writes `preview.png`
(images with their captions) and `preview.json` (captions, token ids, decoded tokens).

  python -m mmjax.main --config=mmjax/configs/shapes_preview.py --workdir=/tmp/mmjax_demo
  python -m mmjax.main --config=mmjax/configs/shapes_preview.py:digits --workdir=/tmp/mmjax_digits
"""

from mmjax.configs import common


def get_config(arg="shapes"):
  config = common.base_config()
  config.trainer = "preview"
  config.data = common.data_config(name=arg, image_size=64, global_batch=32, text_length=32)
  config.tokenizer = common.tokenizer_config(vocab_size=1024)
  config.preview_columns = 8
  return config
