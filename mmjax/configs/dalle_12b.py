"""DALL·E 12B (Ramesh et al., 2021): 64 layers × 3968 wide (62 heads of 64) over 256 text tokens
then a 32×32 grid of dVAE codes, with row / column / convolutional sparse attention.

  python -m mmjax.main --config=mmjax/configs/dalle_12b.py --workdir=gs://BUCKET/dalle_12b
  python -m mmjax.tools.aot --config=mmjax/configs/dalle_12b.py --topology=v5e:4x4

The model is the paper's (≈12.3B parameters: 12.1B in the blocks, 0.2B in the embeddings and the
head): BPE text vocabulary 16,384 plus one learned pad token per text position, 8192 image codes
from 256 px images (the dVAE downsamples by 8), an 11×11 convolutional window in the last layer.
It trains in bf16 with f32 parameters, layers scanned and rematerialised, attention with TPU
splash kernels. The batch is the paper's 1024.

Mesh: parameters are sharded over `fsdp` (the `embed` axis, 3968 = 2⁷·31, so up to 128 ways); past
128 chips put the rest on `data` (e.g. --config.mesh.ici.fsdp=128 --config.mesh.ici.data=-1). The
62 heads (2·31) allow `tensor` = 1 or 2 only.
"""

import ml_collections

from mmjax.configs import common

TEXT_VOCAB_SIZE = 16384
TEXT_LENGTH = 256
IMAGE_SIZE = 256
DVAE_DOWNSAMPLE = 8         # the dVAE's three max-pools: 256 px → a 32×32 grid
IMAGE_VOCAB_SIZE = 8192
PAPER_BATCH = 1024


def model_config(text_vocab_size=TEXT_VOCAB_SIZE, text_length=TEXT_LENGTH, image_vocab_size=IMAGE_VOCAB_SIZE,
                 grid_size=IMAGE_SIZE // DVAE_DOWNSAMPLE, width=3968, num_layers=64, num_heads=62, kernel_size=11,
                 attention_kernel="splash", scan_layers=True, remat=True, dtype="bfloat16"):
  """`config.model` for `mmjax.models.dalle.from_model_config`: heads of 64 and a 4× MLP."""
  return ml_collections.ConfigDict({
      "kind": "dalle",
      "text_vocab_size": text_vocab_size,
      "text_length": text_length,
      "image_vocab_size": image_vocab_size,
      "grid_size": grid_size,
      "width": width,
      "num_layers": num_layers,
      "num_heads": num_heads,
      "mlp_dim": 4 * width,
      "kernel_size": kernel_size,
      "activation": "gelu",
      "attention_kernel": attention_kernel,   # splash on TPU; axial or dense on CPU/GPU
      "block_size": 128,
      "scan_layers": scan_layers,
      "remat": remat,
      "remat_policy": "nothing_saveable",     # keep only each block's input for the backward pass
      "dtype": dtype,
      "param_dtype": "float32",
  })


def training_config(config, num_train_steps=430_000, learning_rate=4.5e-4, warmup_steps=5000,
                    decay_steps=430_000, end_learning_rate=4.5e-4 / 32, accumulation_steps=0,
                    microbatch_per_shard=1, accumulation_dtype="bfloat16", ema_decay=0.0,
                    moment_dtype="bfloat16", param_copy_dtype="bfloat16"):
  """The transformer trainer's fields (mmjax/train/dalle.py), by default the paper's recipe: AdamW
  β=(0.9, 0.96), ε=1e-8, weight decay 4.5e-2 (not on gains, biases, embeddings or position tables),
  gradients clipped at global norm 4, a linear warmup to 4.5e-4 over 5000 updates, 430k updates of
  1024 captions. The paper halved the rate whenever the loss plateaued, five times (ending 32×
  lower); a cosine to the same end rate stands in for that. It kept the Adam moments in 16 bits
  (`moment_dtype`) and computed with 16-bit copies of the params (`param_copy_dtype`). No EMA of
  the params by default (another f32 copy). Tiny configs call this with shorter schedules."""
  config.trainer = "dalle"
  config.num_train_steps = num_train_steps
  config.data.source = "tokens"       # tokens (the encode job's files) | synthetic (learnable random rows)
  config.data.synthetic_words = 4     # caption words per synthetic row
  # Microbatches per update (gradients averaged: the same update as the whole batch). 0 = as many
  # as keep `microbatch_per_shard` rows on each batch shard, whatever the slice size.
  config.accumulation_steps = accumulation_steps
  config.microbatch_per_shard = microbatch_per_shard
  # The running sum of the microbatch gradients. bfloat16 saves 1.4 GiB per v5e chip against
  # float32, which the 12B on a v5e-16 needs; its rounding (~1% after 64 microbatches) is far
  # below the gradient's sampling noise. float32 where HBM allows (v4-64).
  config.accumulation_dtype = accumulation_dtype
  config.optimizer = ml_collections.ConfigDict({
      "learning_rate": learning_rate,       # peak, reached after a linear warmup from 0
      "warmup_steps": warmup_steps,
      "decay_steps": decay_steps,           # the cosine ends here (counted from step 0), then flat
      "end_learning_rate": end_learning_rate,
      "b1": 0.9, "b2": 0.96, "eps": 1e-8,
      "weight_decay": 4.5e-2,               # decoupled
      "grad_clip_norm": 4.0,
      "moment_dtype": moment_dtype,         # Adam's mu and nu ("" = the params' float32)
  })
  # Gradients are taken with respect to the params' matrices cast to this dtype (mixed precision:
  # half-size all-gathers and gradients); "" = the f32 params themselves.
  config.param_copy_dtype = param_copy_dtype
  config.text_loss_weight = 1 / 8           # loss = text/8 + image·7/8
  # Fraction of captions replaced by the all-pad caption, so the model also learns p(image) and
  # `mmjax.generate --guidance_scale` has an unconditional model to guide against. The paper
  # trained without; classifier-free guidance needs it (e.g. 0.1-0.2).
  config.caption_dropout = 0.0
  config.ema_decay = ema_decay              # 0 = no EMA: eval and export use the params
  config.rng_impl = ""                      # init PRNG ("" = JAX's default; "rbg" compiles faster on CPU)
  config.eval_split = "validation"          # the token files' split for the validation loss
  config.eval_batches = 0                   # 0 = the whole split
  config.eval_every_steps = 10_000
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.keep_checkpoints = 3
  config.sample_every_steps = 0             # sample grids via mmjax.generate (0 = off)
  config.sample_rows = 8                    # captions of the current batch sampled per grid
  config.sample_dvae = ""                   # the dVAE export that decodes them ("" = <workdir>/dvae)
  return config


def get_config():
  config = common.base_config()
  config.trainer = "dalle"
  config.mesh = common.mesh_config(data=1, fsdp=-1, tensor=1)
  config.data = common.data_config(name="tfrecord", image_size=IMAGE_SIZE, global_batch=PAPER_BATCH,
                                   text_length=TEXT_LENGTH)
  config.data.path = "gs://YOUR_BUCKET/image_text/train-*.tfrecord"
  config.data.tokens_dir = ""       # the dVAE encode job's token files ("" = <workdir>/tokens)
  config.tokenizer = common.tokenizer_config(vocab_size=TEXT_VOCAB_SIZE)
  config.model = model_config()
  training_config(config)
  return config
