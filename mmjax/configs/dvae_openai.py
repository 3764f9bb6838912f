"""OpenAI's dVAE at full size: 256×256 images → a 32×32 grid of codes from a vocabulary of 8192.

  python -m mmjax.main --config=mmjax/configs/dvae_openai.py --workdir=gs://BUCKET/dvae_openai

The model is the released `dall_e` architecture (n_hid 256, 4 groups × 2 resblocks, n_init 128;
≈98M parameters, 54M in the encoder), so OpenAI's weights convert onto it with
`python -m mmjax.tools.convert_openai_dvae`. Sized for a v5e-16 slice: the global batch of 512
splits 16 ways (32 images per chip) and parameters plus AdamW moments are sharded 4 ways (fsdp)
within data-parallel groups of 4. Each resblock is rematerialised and the gradient accumulated
over microbatches of 2 images per chip (16 per update on a v5e-16), which compiles to 3.44 GiB per
v5e chip (`python -m mmjax.tools.aot --config=mmjax/configs/dvae_openai.py --topology=v5e:4x4`;
bench/results/aot.md).
"""

import ml_collections

from mmjax.configs import common


def model_config():
  """`config.model` for `mmjax.models.dvae.from_model_config`: bf16 compute, f32 params."""
  return ml_collections.ConfigDict({
      "kind": "dvae",
      "n_hid": 256,
      "n_blk_per_group": 2,
      "group_count": 4,          # 256 px / 2^(4−1) = a 32×32 code grid
      "vocab_size": 8192,
      "n_init": 128,
      "input_channels": 3,
      "output_channels": 3,      # the decoder emits 2·3 logit-Laplace statistics per pixel
      "dtype": "bfloat16",
      "param_dtype": "float32",
      "remat": True,             # recompute each resblock in the backward pass (less HBM)
  })


def training_config(config, num_train_steps=3_000_000, learning_rate=1e-4, warmup_steps=2000,
                    decay_steps=1_200_000, end_learning_rate=1.25e-6, temperature_steps=150_000,
                    kl_weight=6.6, kl_warmup_steps=5000, ema_decay=0.999, min_log_scale=None,
                    accumulation_steps=1, microbatch_per_shard=1, accumulation_dtype="float32",
                    likelihood="logit_laplace", gaussian_scale=0.1, straight_through=False, usage_weight=0.0):
  """The dVAE trainer's fields (mmjax/train/dvae.py), by default the paper's recipe (DALL·E §A.2):
  3M updates; AdamW β=(0.9, 0.999), ε=1e-8, weight decay 1e-4, step size cosine-annealed
  1e-4 → 1.25e-6 over 1.2M updates (the 2k-step linear warmup is ours); gumbel-softmax
  temperature cosine-annealed 1 → 1/16 over 150k updates; KL weight β linear 0 → 6.6 over 5k
  updates; EMA decay 0.999. Tiny configs call this with scaled lengths."""
  config.trainer = "dvae"
  config.num_train_steps = num_train_steps
  config.optimizer = ml_collections.ConfigDict({
      "learning_rate": learning_rate,       # peak, reached after a linear warmup from 0
      "warmup_steps": warmup_steps,
      "decay_steps": decay_steps,           # the cosine ends here (counted from step 0), then flat
      "end_learning_rate": end_learning_rate,
      "b1": 0.9, "b2": 0.999, "eps": 1e-8,
      "weight_decay": 1e-4,                 # decoupled; not on biases
      "grad_clip_norm": 0.0,                # 0 = no clipping
  })
  config.ema_decay = ema_decay              # EMA of the params: eval and export use it
  # Gradient accumulation (mmjax.train.accumulate): microbatches per update, or with 0 as many as
  # keep `microbatch_per_shard` images on each batch shard, whatever the slice size.
  config.accumulation_steps = accumulation_steps
  config.microbatch_per_shard = microbatch_per_shard
  config.accumulation_dtype = accumulation_dtype  # the running gradient sum: "float32" or "bfloat16"
  config.temperature = ml_collections.ConfigDict({  # gumbel-softmax τ, cosine start → end
      "start": 1.0, "end": 1.0 / 16, "anneal_steps": temperature_steps})
  config.kl = ml_collections.ConfigDict({   # β, linear 0 → weight
      "weight": kl_weight, "warmup_steps": kl_warmup_steps})
  # Floor on the logit-Laplace log-scale (None: none). Images with exactly flat regions (the
  # synthetic shapes) otherwise buy unbounded likelihood there; see dvae.floor_log_scale.
  config.min_log_scale = ml_collections.config_dict.placeholder(float)
  config.min_log_scale = min_log_scale
  # Reconstruction likelihood: the paper's "logit_laplace", or "gaussian" (fixed std gaussian_scale in
  # the pixel map), which the tiny configs use: see dvae_shapes.py for why.
  config.likelihood = likelihood
  config.gaussian_scale = gaussian_scale
  # True: the decoder sees the gumbel sample's one-hot argmax, gradients flow through the relaxed
  # sample (straight-through). The paper decodes the relaxed sample itself (False).
  config.straight_through = straight_through
  # Weight of KL(batch-mean posterior ‖ uniform) added to the per-pixel-dimension loss: keeps codes
  # in use without penalising confident posteriors (0 in the paper).
  config.usage_weight = usage_weight
  config.eval_split = "validation"
  config.eval_batches = 0                   # 0 = the whole split
  config.eval_every_steps = 10_000
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.keep_checkpoints = 3
  config.grid_images = 16                   # originals in each reconstructions/step_N.png
  config.grid_columns = 8
  return config


def get_config():
  config = common.base_config()
  config.trainer = "dvae"
  config.mesh = common.mesh_config(data=-1, fsdp=4)
  config.data = common.data_config(name="tfrecord", image_size=256, global_batch=512)
  # Your images: --config.data.path=GLOB (TFRecords) or --config.data.name=folder --config.data.path=DIR.
  config.data.path = "gs://YOUR_BUCKET/images/train-*.tfrecord"
  config.data.random_crop = True
  config.data.pixel_map = "dvae"
  config.tokenizer = common.tokenizer_config(vocab_size=16384)
  config.model = model_config()
  # 512 images = 16 microbatches of 2 images per chip on a v5e-16 (see bench/results/aot.md).
  training_config(config, accumulation_steps=0, microbatch_per_shard=2)
  # TFRecords/folders have no validation split: eval reads these many batches of the data.
  config.eval_batches = 4
  return config
