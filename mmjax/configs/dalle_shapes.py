"""Tiny DALL·E transformer on the token files of a tiny dVAE: trains in a few minutes on a 2-core CPU.

  python -m mmjax.main --config=mmjax/configs/dvae_shapes.py --workdir=/tmp/shapes
  python -m mmjax.main --config=mmjax/configs/dvae_encode.py --workdir=/tmp/shapes
  python -m mmjax.main --config=mmjax/configs/dalle_shapes.py --workdir=/tmp/shapes

ARG: shapes (default) | digits | mnist, as for dvae_shapes.py and dvae_encode.py, whose outputs
(<workdir>/tokens) this reads. Sizes follow them: 32 text tokens from the 1024-piece tokenizer (the
longest shapes caption is 30 tokens, the longest digits caption 19), a 16×16 grid of codes from a
vocabulary of 512, so the sequence is 32 + 256 = 288 tokens. Four layers × 64 give the paper's
schedule in small: row, column, row, conv (5×5 window). f32 compute: bf16 is slow on CPU. The
"axial" attention kernel and unrolled layers make the train step 1.7× faster on a CPU than "dense"
attention in a scan (3.08 against 1.80 steps/s alone: `.venv/bin/python bench/dalle_step.py`);
6 layers × 128 ran at 0.7/s with "dense". A learning rate of 3e-3 reached an image loss of 0.96
nats per code after 900 updates, against 1.49 after 600 at 1e-3.
"""

from mmjax.configs import common, dalle_12b, dvae_encode, dvae_shapes

DATASETS = ("shapes", "digits", "mnist")


def get_config(arg="shapes"):
  if arg not in DATASETS:
    raise ValueError(f"dalle_shapes.py:{arg}: expected one of {DATASETS}")
  encode = dvae_encode.get_config(arg)
  dvae = dvae_shapes.model_config()
  grid_size = encode.data.image_size // 2 ** (dvae.group_count - 1)  # the dVAE pools after all groups but the last
  config = common.base_config()
  config.trainer = "dalle"
  config.mesh = common.mesh_config(data=-1)
  config.data = common.data_config(name=arg, image_size=encode.data.image_size, global_batch=32,
                                   text_length=encode.data.text_length)
  config.data.tokens_dir = ""       # the dVAE encode job's token files ("" = <workdir>/tokens)
  config.tokenizer = encode.tokenizer
  config.model = dalle_12b.model_config(
      text_vocab_size=encode.tokenizer.vocab_size, text_length=encode.data.text_length,
      image_vocab_size=dvae.vocab_size, grid_size=grid_size, width=64, num_layers=4, num_heads=2, kernel_size=5,
      attention_kernel="axial", scan_layers=False, remat=False, dtype="float32")
  steps = 1500
  dalle_12b.training_config(config, num_train_steps=steps, learning_rate=3e-3, warmup_steps=steps // 20,
                            decay_steps=steps, end_learning_rate=1e-5, accumulation_steps=1,
                            accumulation_dtype="float32", ema_decay=0.99, moment_dtype="", param_copy_dtype="")
  config.rng_impl = "rbg"       # threefry's init compiles slowly on a CPU
  config.eval_every_steps = 500
  config.eval_batches = 8           # of the validation split: the whole of it takes ~35 s
  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 2
  return config
