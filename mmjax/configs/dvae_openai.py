"""OpenAI's dVAE at full size: 256×256 images → a 32×32 grid of codes from a vocabulary of 8192.

  python -m mmjax.main --config=mmjax/configs/dvae_openai.py --workdir=gs://BUCKET/dvae_openai

The model is the released `dall_e` architecture (n_hid 256, 4 groups × 2 resblocks, n_init 128;
≈98M parameters, 54M in the encoder), so OpenAI's weights convert onto it with
`python -m mmjax.tools.convert_openai_dvae`. Sized for a v5e-16 slice: the global batch of 512
splits 16 ways (32 images per chip) and parameters plus AdamW moments are sharded 4 ways (fsdp)
within data-parallel groups of 4.
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
      "remat": False,            # True recomputes each resblock in the backward pass (less HBM)
  })


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
  return config
