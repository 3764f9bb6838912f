"""OpenAI CLIP ViT-L/14@336px: ViT-L/14 at 336 px (577 positions), fine-tuned from the 224 px model.

  python -m mmjax.main --config=mmjax/configs/clip_vit_l14_336.py --workdir=gs://BUCKET/clip_vit_l14_336
  python -m mmjax.tools.convert_openai_clip --input=ViT-L-14-336px.pt --output=gs://BUCKET/clip_l14_336

OpenAI trained ViT-L/14 at 224 px and then one more epoch at 336 px; this config is that extra
epoch (12,207 steps of 32,768 pairs at peak learning rate 2e-5). Starting it from a 224 px
checkpoint needs the vision positions resized from 16² + 1 to 24² + 1 (not done here).
"""

from mmjax.configs import clip_vit_b32, clip_vit_l14


def get_config():
  return clip_vit_b32.clip_config(clip_vit_l14.model_config(image_size=336), learning_rate=2e-5, fsdp=4,
                                  num_train_steps=12_207)
