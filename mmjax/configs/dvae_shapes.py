"""Tiny dVAE on an embedded dataset: trains in a few minutes on a 2-core CPU.

  python -m mmjax.main --config=mmjax/configs/dvae_shapes.py:shapes --workdir=/tmp/dvae_shapes
  python -m mmjax.main --config=mmjax/configs/dvae_shapes.py:mnist --workdir=/tmp/dvae_mnist

ARG: shapes (default) | digits | mnist. 32 px images → an 8×8 grid of codes from a vocabulary of
512, so the transformer models 64 image tokens. The recipe is the paper's
(`dvae_openai.training_config`) with the schedules shortened to the run's length.
"""

import ml_collections

from mmjax.configs import common, dvae_openai


def model_config(n_hid=32, n_blk_per_group=1, group_count=3, vocab_size=512, n_init=64,
                 dtype="float32", remat=False):
  """A `config.model` for `mmjax.models.dvae.from_model_config` (f32 compute: bf16 is slow on CPU)."""
  return ml_collections.ConfigDict({
      "kind": "dvae", "n_hid": n_hid, "n_blk_per_group": n_blk_per_group, "group_count": group_count,
      "vocab_size": vocab_size, "n_init": n_init, "input_channels": 3, "output_channels": 3,
      "dtype": dtype, "param_dtype": "float32", "remat": remat,
  })


def get_config(arg="shapes"):
  if arg not in ("shapes", "digits", "mnist"):
    raise ValueError(f"dvae_shapes.py:{arg}: expected shapes, digits or mnist")
  config = common.base_config()
  config.data = common.data_config(name=arg, image_size=32, global_batch=32)
  config.data.shuffle_buffer = 1024
  if arg == "shapes":
    config.data.num_examples = 10_000     # train split: builds in seconds; ~2 epochs per run
  config.model = model_config()
  steps = 600
  dvae_openai.training_config(
      config, num_train_steps=steps, learning_rate=1e-3, warmup_steps=20, decay_steps=steps,
      end_learning_rate=1e-4, temperature_steps=steps // 2, kl_weight=6.6, kl_warmup_steps=steps // 6,
      ema_decay=0.99, min_log_scale=-3.0)
  config.eval_every_steps = steps
  config.log_every_steps = 50
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 2
  return config
