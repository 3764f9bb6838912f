"""Tiny dVAE on an embedded dataset: trains in a few minutes on a 2-core CPU.

  python -m mmjax.main --config=mmjax/configs/dvae_shapes.py:shapes --workdir=/tmp/dvae_shapes
  python -m mmjax.main --config=mmjax/configs/dvae_shapes.py:mnist --workdir=/tmp/dvae_mnist

ARG: shapes (default) | digits | mnist. 32 px images → a 16×16 grid of codes from a vocabulary of
512, so the transformer models 256 image tokens. An 8×8 grid (4×4 pixels a code) plateaus at
≈20 dB here: the 8 px shapes come back as coloured blobs whatever the vocabulary (512 or 8192).

The recipe is the paper's (`dvae_openai.training_config`: AdamW, gumbel-softmax codes, EMA
export) with three changes a run of a few thousand updates needs; each was measured on shapes:
- a Gaussian likelihood (std 0.1 in the pixel map) instead of the logit-Laplace: the latter pays
  most for sharpening the flat black background and the codes collapse (12 dB after 1000 steps,
  against 24 dB);
- straight-through codes at a constant temperature 1 and no KL penalty (β = 0): annealing τ to
  1/16 within the run saturates the softmax and stops the encoder learning, and β > 0 pushes the
  posteriors towards uniform before they carry anything;
- a small penalty on uneven codebook use (`usage_weight`), without which 10–15 codes are used.
"""

import ml_collections

from mmjax.configs import common, dvae_openai


def model_config(n_hid=32, n_blk_per_group=1, group_count=2, vocab_size=512, n_init=64,
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
    config.data.num_examples = 10_000     # train split: builds in seconds; ~6 epochs per run
  config.model = model_config()
  steps = 2000
  dvae_openai.training_config(
      config, num_train_steps=steps, learning_rate=1e-3, warmup_steps=20, decay_steps=steps,
      end_learning_rate=1e-4, kl_weight=0.0, ema_decay=0.99, likelihood="gaussian", gaussian_scale=0.1,
      straight_through=True, usage_weight=0.1)
  config.temperature.end = 1.0            # constant τ: only the gradients see it (straight-through)
  config.eval_every_steps = steps
  config.log_every_steps = 50
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 2
  return config
