"""The whole pipeline on the embedded shapes set: what `make demo` runs (12–15 minutes on a 2-core CPU).

  python -m mmjax.main --config=mmjax/configs/shapes_demo.py --workdir=demo_workdir

Trains the tokenizer, the dVAE, encodes every split, trains the DALL·E transformer and CLIP,
then samples candidates for held-out test captions and reranks them with CLIP, writing
samples.png and metrics.json (the shapes oracle's accuracy) into the workdir; see
mmjax/train/demo.py for the stages and their outputs. Each stage is its usual config
(dvae_shapes, dvae_encode, dalle_shapes, clip_shapes) with fewer updates (DEMO_STEPS), so
`--config.stages.dalle.num_train_steps=…` changes one (with its `optimizer.decay_steps`); a rerun
reuses finished stages.
"""

import ml_collections

from mmjax.configs import clip_shapes, common, dalle_shapes, dvae_encode, dvae_shapes

# One shapes build (32 px) serves every stage: the train split's size is shared.
NUM_TRAIN_EXAMPLES = 10_000
# Updates per trained stage, cut from each config's own so the whole demo fits in 15 minutes on a
# 2-core CPU. Clean-clone runs of session 8: 1,018 s with 1,000 / 800 / 1,200 updates (dvae 299 s,
# encode 27, dalle 385, clip 231, samples 73); 731 s with 800 / 600 / 1,000 (238, 25, 223, 172, 69),
# where CLIP reached only 13% held-out zero-shot (39% at 1,200), hence CLIP's 1,200 then. Session
# 10, with the banded row mask's slower DALL·E step: 839 s (237, 28, 247, 228, 94); session 11, on a
# quieter machine: 717 s (223, 27, 215, 175, 73). Session 12 made the DALL·E step 1.33× faster
# (the loss's head computes each modality's block only), so 800 updates take what 600 took; its
# clean-clone run took 1,015 s (267, 30, 318, 297, 99) on a day the machine ran the unchanged
# dVAE and CLIP stages 1.2–1.7× slower than in session 11. Session 13's CLIP step is 1.5× faster
# (the last block computes the pooled position only), yet on an equally slow day the stages took
# 945 s (263, 28, 325, 214, 111); hence CLIP's 1,100 and 50 two-object captions: 877 s (258, 24,
# 325, 190, 75) on that day, from a clean clone. Session 14, slower still: 1,082 s (319, 31, 446
# with a 57 s stall after the export, 205, 75). 700 / 600 / 1,000 took 798 s, but the dVAE fell
# to 61% and CLIP to 26% zero-shot (both curves are steep there). Hence 800 / 600 / 1,100, the
# transformer back at session 11's 600: 818 s (272, 25, 242, 195, 79). The README lists the stage
# times and what each stage reaches at these budgets.
DEMO_STEPS = {"dvae": 800, "dalle": 600, "clip": 1100}


def shorten(stage, steps):
  """Runs `stage` (a trainer config) for `steps` updates: schedule, evals and checkpoints follow
  (the cosine keeps its length relative to the run: CLIP's stops halfway, the others run out)."""
  stage.optimizer.decay_steps = steps * stage.optimizer.decay_steps // stage.num_train_steps
  stage.num_train_steps = steps
  stage.optimizer.warmup_steps = min(stage.optimizer.warmup_steps, steps // 20)
  stage.eval_every_steps = steps
  stage.checkpoint_every_steps = min(stage.checkpoint_every_steps, steps)


def samples_config(data):
  """The samples stage: sampling and reranking settings; paths are filled in by the demo trainer."""
  config = common.base_config()
  config.trainer = "shapes_samples"
  config.data = data
  config.split = "test"
  config.num_one_object_captions = 100   # distinct held-out captions: the target group
  config.num_two_object_captions = 50    # none is right in every attribute yet: 50 show it (README)
  config.num_candidates = 8       # per caption; CLIP keeps the best
  config.top = 4                  # shown per caption in samples.png
  config.grid_captions = 12       # rows of samples.png
  config.temperature = 1.0
  config.top_k = 0
  config.top_p = 1.0
  # Guidance (off: at 600 transformer updates it did not help; README). "shape" guides each
  # candidate away from its caption with another shape word; "" with a scale is classifier-free guidance.
  config.guidance_scale = ml_collections.FieldReference(None, field_type=float)  # a float flag sets it
  config.guide_against = ""       # "" | "colour" | "shape"
  config.seed = 0
  config.batch_size = 200         # candidates per sampling call: 1600 took 75 s, against 85 s in calls of 64
  config.data_dir = ""            # filled in: <workdir>/tfds
  config.dalle = ""               # filled in: the exports of the earlier stages
  config.dvae = ""
  config.clip = ""
  config.tokenizer = ""
  config.tokens_dir = ""          # filled in: the encode stage's token files ("" = no likelihood test)
  return config


def get_config():
  config = common.base_config()
  config.trainer = "demo"
  stages = ml_collections.ConfigDict()
  stages.dvae = dvae_shapes.get_config("shapes")
  stages.encode = dvae_encode.get_config("shapes")
  stages.dalle = dalle_shapes.get_config("shapes")
  stages.clip = clip_shapes.get_config("shapes")
  for stage in (stages.dvae, stages.encode, stages.dalle, stages.clip):
    stage.data.num_examples = NUM_TRAIN_EXAMPLES
  for name, steps in DEMO_STEPS.items():
    shorten(stages[name], steps)
  stages.dvae.eval_batches = 16   # 512 validation images: the oracle on all 2,000 takes ~20 s
  stages.samples = samples_config(stages.encode.data.copy_and_resolve_references())
  config.stages = stages
  return config
