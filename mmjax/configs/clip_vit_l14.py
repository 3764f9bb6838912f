"""OpenAI CLIP ViT-L/14: 24 × 1024 vision transformer on 14 px patches, 12 × 768 text, embed 768.

  python -m mmjax.main --config=mmjax/configs/clip_vit_l14.py --workdir=gs://BUCKET/clip_vit_l14
  python -m mmjax.tools.convert_openai_clip --input=ViT-L-14.pt --output=gs://BUCKET/clip_vit_l14_openai

≈428M parameters: params and AdamW moments are sharded 4 ways (fsdp) and block activations are
recomputed in the backward pass. The paper's recipe as in clip_vit_b32.py, peak learning rate 4e-4.
"""

from mmjax.configs import clip_vit_b32


def model_config(image_size=224):
  return clip_vit_b32.model_config(embed_dim=768, image_size=image_size, patch_size=14, vision_width=1024,
                                   vision_layers=24, text_width=768, text_layers=12, remat=True)


def get_config():
  return clip_vit_b32.clip_config(model_config(), learning_rate=4e-4, fsdp=4)
