"""Config pieces shared by every experiment: mesh, logical axis rules, data and tokenizer."""

import ml_collections

# Logical axis -> mesh axes. Models name only the logical axes on the left; changing a
# layout means editing this table (or a config's copy of it), never a model.
DEFAULT_LOGICAL_AXIS_RULES = (
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("layers", None),
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


def mesh_config(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1):
  """ICI sizes within a slice (one may be -1: the rest), DCN sizes across slices."""
  return ml_collections.ConfigDict({
      "ici": {"data": data, "fsdp": fsdp, "tensor": tensor},
      "dcn": {"data": dcn_data, "fsdp": dcn_fsdp, "tensor": dcn_tensor},
  })


def data_config(name="shapes", image_size=64, global_batch=64, text_length=32):
  return ml_collections.ConfigDict({
      "name": name,                 # shapes | digits | mnist | folder | tfrecord
      "data_dir": "",               # TFDS data dir ("" = <workdir>/tfds)
      "path": "",                   # folder or TFRecord glob for name=folder|tfrecord
      "split": "train",
      "image_size": image_size,
      "random_crop": False,
      "random_shift": 0,            # train-time translation by up to N px each way (zero padding)
      "grayscale_prob": 0.0,        # train-time chance of a grey image whose caption loses...
      "grayscale_words": "",        # ...these comma-separated words (e.g. the colour names)
      "pixel_map": "dvae",          # dvae | clip | unit
      "global_batch": global_batch,
      "shuffle_buffer": 2048,
      "text_length": text_length,
      "text_layout": "dalle",       # dalle (per-position padding) | clip (bos ... eos)
      "num_examples": 0,            # shapes train-split size override (0 = builder default)
  })


def tokenizer_config(vocab_size=1024):
  return ml_collections.ConfigDict({
      "vocab_size": vocab_size,     # 16,384 at full size
      "corpus": "cupl",             # cupl (clip-benchmark's captions) | dataset (the data's own
                                    # train captions) | comma-separated text files
      "model_path": "",             # "" = <workdir>/tokenizer/spm.model
  })


def base_config():
  config = ml_collections.ConfigDict()
  config.trainer = ""
  config.seed = 0
  config.mesh = mesh_config()
  config.logical_axis_rules = DEFAULT_LOGICAL_AXIS_RULES
  config.distributed = False        # call jax.distributed.initialize() (auto on TPU pods)
  return config
