"""OpenAI CLIP ViT-B/16: ViT-B/32 with 16 px patches (196 patches per 224 px image).

  python -m mmjax.main --config=mmjax/configs/clip_vit_b16.py --workdir=gs://BUCKET/clip_vit_b16
  python -m mmjax.tools.convert_openai_clip --input=ViT-B-16.pt --output=gs://BUCKET/clip_vit_b16_openai

≈150M parameters; the paper's recipe as in clip_vit_b32.py (peak learning rate 5e-4).
"""

from mmjax.configs import clip_vit_b32


def get_config():
  return clip_vit_b32.clip_config(clip_vit_b32.model_config(patch_size=16), learning_rate=5e-4)
