"""OpenAI CLIP ViT-B/32: 224 px images in 32 px patches, 12 × 768 vision and 12 × 512 text transformers.

  python -m mmjax.main --config=mmjax/configs/clip_vit_b32.py --workdir=gs://BUCKET/clip_vit_b32
  python -m mmjax.tools.convert_openai_clip --input=ViT-B-32.pt --output=gs://BUCKET/clip_vit_b32_openai

The model is OpenAI's (≈151M parameters, embed 512, quick-GELU, byte-level BPE with 49,408 ids,
context 77), so released weights convert onto it. The recipe is the paper's (Table 20): batch
32,768, 32 epochs over 400M pairs, AdamW (β2 0.98, ε 1e-6, weight decay 0.2), 2,000 warmup steps
then cosine decay; a random square crop of the resized image is the only augmentation.
`model_config` and `clip_config` are shared by clip_vit_b16.py, clip_vit_l14.py and clip_vit_l14_336.py.
"""

import math

import ml_collections

from mmjax.configs import common

CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408          # OpenAI's BPE: 256 bytes × 2 + 48,894 merges + start/end of text
PAPER_BATCH = 32768
PAPER_STEPS = 390_625       # 32 epochs × 400M pairs / 32,768


def model_config(embed_dim=512, image_size=224, patch_size=32, vision_width=768, vision_layers=12,
                 text_width=512, text_layers=12, remat=False):
  """`config.model` for `mmjax.models.clip.from_model_config`: heads of 64 and 4× MLPs, as OpenAI's."""
  return ml_collections.ConfigDict({
      "kind": "clip",
      "embed_dim": embed_dim,
      "image_size": image_size,
      "patch_size": patch_size,
      "vision_width": vision_width,
      "vision_layers": vision_layers,
      "vision_heads": vision_width // 64,
      "vision_mlp_dim": 4 * vision_width,
      "context_length": CONTEXT_LENGTH,
      "vocab_size": VOCAB_SIZE,
      "text_width": text_width,
      "text_layers": text_layers,
      "text_heads": text_width // 64,
      "text_mlp_dim": 4 * text_width,
      "activation": "quick_gelu",
      "logit_scale_init": math.log(1 / 0.07),
      "max_logit_scale": 100.0,
      "scan_layers": True,      # one compiled block per tower; converted weights: --scan_layers
      "remat": remat,           # recompute block activations in the backward pass (less HBM)
      "dtype": "bfloat16",
      "param_dtype": "float32",
  })


def clip_config(model, learning_rate, fsdp=1, global_batch=PAPER_BATCH, num_train_steps=PAPER_STEPS):
  """The experiment around `model`: image–text TFRecords, OpenAI's tokenizer, the paper's optimizer."""
  config = common.base_config()
  config.trainer = "clip"
  config.mesh = common.mesh_config(data=-1, fsdp=fsdp)
  config.data = common.data_config(name="tfrecord", image_size=model.image_size, global_batch=global_batch,
                                   text_length=model.context_length)
  config.data.path = "gs://YOUR_BUCKET/image_text/train-*.tfrecord"
  config.data.random_crop = True
  config.data.pixel_map = "clip"
  config.data.text_layout = "clip"
  config.tokenizer = ml_collections.ConfigDict({
      "kind": "openai_bpe",     # mmjax.input_pipeline.clip_bpe.ClipTokenizer
      "merges_path": "",        # bpe_simple_vocab_16e6.txt.gz; "" = the copy in an installed clip/open_clip
      "vocab_size": VOCAB_SIZE,
  })
  config.model = model
  config.num_train_steps = num_train_steps
  config.optimizer = ml_collections.ConfigDict({
      "learning_rate": learning_rate,       # peak, after a linear warmup from 0
      "warmup_steps": 2000,
      "decay_steps": num_train_steps,       # cosine decay ends here
      "end_learning_rate": 0.0,
      "b1": 0.9, "b2": 0.98, "eps": 1e-6,
      "weight_decay": 0.2,                  # decoupled; not on gains, biases, embeddings or logit_scale
      "grad_clip_norm": 0.0,
  })
  config.accumulation_steps = 1             # >1: gradient caching over microbatches, same update
  config.ema_decay = 0.9999                 # EMA of the params: eval and export use it
  config.eval_data_path = "gs://YOUR_BUCKET/image_text/validation-*.tfrecord"  # folder/tfrecord eval set
  config.eval_split = "validation"          # TFDS datasets (shapes, digits, mnist)
  config.eval_examples = 5000               # image–caption pairs for retrieval recall (0 = whole split)
  config.zeroshot_split = ""                # split of the dataset's zero-shot task (mmjax.zeroshot); "" = none
  config.eval_every_steps = 10_000
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.keep_checkpoints = 3
  return config


def get_config():
  return clip_config(model_config(), learning_rate=5e-4)
