"""Encode a dataset with a trained dVAE: the transformer's training data (argmax codes + text tokens).

Reads the exported dVAE in `<workdir>/dvae` (or `config.dvae_checkpoint`), and writes per-host
sharded TFRecords plus metadata.json to `<workdir>/tokens` (or `config.output_dir`); see
mmjax/input_pipeline/token_files.py for the format. Rerunning resumes after the finished shards.
The defaults pair with mmjax/configs/dvae_shapes.py (32 px images) run in the same workdir:

  python -m mmjax.main --config=mmjax/configs/dvae_shapes.py --workdir=/tmp/dvae_shapes
  python -m mmjax.main --config=mmjax/configs/dvae_encode.py --workdir=/tmp/dvae_shapes
  python -m mmjax.main --config=mmjax/configs/dvae_encode.py:mnist --workdir=/tmp/dvae_mnist \
      --config.dvae_checkpoint=/elsewhere/dvae --config.splits=train --config.max_shards_per_run=1
"""

from mmjax.configs import common


def get_config(arg="shapes"):
  config = common.base_config()
  config.trainer = "dvae_encode"
  # image_size must be the size the dVAE was trained at; pixel_map stays "dvae", crops are central.
  config.data = common.data_config(name=arg, image_size=32, global_batch=64, text_length=32)
  config.tokenizer = common.tokenizer_config(vocab_size=1024)
  config.dvae_checkpoint = ""       # exported dVAE dir ("" = <workdir>/dvae)
  config.dvae_dtype = ""            # compute dtype override, e.g. "float32" ("" = as exported)
  config.splits = "train,validation,test"  # comma-separated
  config.output_dir = ""            # token files ("" = <workdir>/tokens)
  config.examples_per_shard = 4096  # per file and host; a multiple of the per-process batch
  config.max_shards_per_run = 0     # stop after this many shards per host (0 = run to the end)
  return config
