"""The demo pipeline's wiring and stage bookkeeping (the stages themselves have their own tests)."""

import json
import os

import numpy as np
import pytest

from mmjax.configs import clip_shapes, dalle_shapes, dvae_shapes, shapes_demo
from mmjax.errors import ConfigError
from mmjax.train import demo


def test_stages_are_wired_to_each_others_outputs(tmp_path):
  config = shapes_demo.get_config()
  stages = demo.wire_stages(config, str(tmp_path))
  tfds_dir = str(tmp_path / "tfds")
  assert {stages[name].data.data_dir for name in ("dvae", "encode", "dalle", "clip")} == {tfds_dir}
  assert stages.encode.dvae_checkpoint == str(tmp_path / "dvae" / "dvae")
  assert stages.dalle.data.tokens_dir == stages.encode.output_dir == str(tmp_path / "tokens")
  assert stages.encode.tokenizer.model_path == stages.dalle.tokenizer.model_path == stages.samples.tokenizer
  assert stages.samples.dalle == str(tmp_path / "dalle" / "dalle")
  assert stages.samples.clip == str(tmp_path / "clip" / "clip")
  assert config.stages.encode.output_dir == ""  # the user's config is left as it was
  # One shapes build serves every stage, and the token files fit the transformer.
  builds = {(stages[n].data.image_size, stages[n].data.num_examples) for n in ("dvae", "encode", "dalle", "clip")}
  assert len(builds) == 1
  assert stages.dalle.model.text_length == stages.encode.data.text_length
  assert stages.dalle.model.text_vocab_size == stages.encode.tokenizer.vocab_size


def test_demo_stages_run_shortened_schedules_that_validate(tmp_path):
  config = shapes_demo.get_config()
  full_length = {"dvae": dvae_shapes.get_config("shapes"), "dalle": dalle_shapes.get_config("shapes"),
                 "clip": clip_shapes.get_config("shapes")}
  for name, steps in shapes_demo.DEMO_STEPS.items():
    stage, full = config.stages[name], full_length[name]
    assert stage.num_train_steps == stage.eval_every_steps == steps
    # The cosine keeps its length relative to the run (CLIP's is twice the run).
    assert stage.optimizer.decay_steps * full.num_train_steps == steps * full.optimizer.decay_steps
    assert 0 < stage.optimizer.warmup_steps < steps
  demo.check_stages(demo.wire_stages(config, str(tmp_path)))
  with config.unlocked():
    config.stages.dalle.optimizer.decay_steps = 10
  with pytest.raises(ConfigError, match="stages.dalle: config.optimizer.decay_steps"):
    demo.check_stages(demo.wire_stages(config, str(tmp_path)))


def test_a_finished_stage_is_reused_only_with_the_same_config(tmp_path):
  workdir = str(tmp_path / "demo")
  stages = demo.wire_stages(shapes_demo.get_config(), workdir)
  directory = os.path.join(workdir, "dvae")
  os.makedirs(directory)
  assert not demo._finished("dvae", directory, stages.dvae, workdir)
  demo._mark_finished(directory, stages.dvae, workdir, seconds=1.0)
  with open(os.path.join(directory, demo.STAGE_FILE)) as f:
    record = json.load(f)
  assert record["seconds"] == 1.0
  assert record["config"]["data"]["data_dir"] == "<workdir>/tfds"  # no absolute path is recorded
  assert demo._finished("dvae", directory, stages.dvae, workdir)
  # Moved, or named by a relative path: the same stage, still reused.
  moved = str(tmp_path / "elsewhere")
  os.rename(workdir, moved)
  assert demo._finished("dvae", os.path.join(moved, "dvae"),
                        demo.wire_stages(shapes_demo.get_config(), moved).dvae, moved)
  relative = os.path.relpath(moved)
  assert demo._finished("dvae", os.path.join(relative, "dvae"),
                        demo.wire_stages(shapes_demo.get_config(), relative).dvae, relative)
  changed = demo.wire_stages(shapes_demo.get_config(), moved).dvae
  changed.num_train_steps += 1
  with pytest.raises(ConfigError, match=f"config.stages.dvae differs.* delete {moved}/dvae to run"):
    demo._finished("dvae", os.path.join(moved, "dvae"), changed, moved)
  # The samples stage runs in the workdir itself: rerunning it means deleting its record only.
  samples = demo.wire_stages(shapes_demo.get_config(), moved).samples
  demo._mark_finished(moved, samples, moved, seconds=1.0)
  samples.guidance_scale = 2.0
  with pytest.raises(ConfigError, match=f"delete {moved}/{demo.STAGE_FILE} to run"):
    demo._finished("samples", moved, samples, moved)


def test_samples_stage_takes_each_caption_group_and_shows_both(monkeypatch):
  from mmjax.train import shapes_samples
  one = [f"{a} red circle" for a in ("a", "a small", "a large", "there is a")]
  two = [f"a red circle {rel} a blue square" for rel in ("above", "below", "left of")]
  # File order mixes the groups and repeats captions; distinct captions keep their first place.
  monkeypatch.setattr(shapes_samples.datasets, "captions",
                      lambda data, data_dir, split: [two[0], one[0], one[0], two[1], one[1], one[2], two[2], one[3]])
  config = shapes_demo.get_config().stages.samples
  config.num_one_object_captions, config.num_two_object_captions = 3, 2
  captions = shapes_samples.test_captions(config)
  assert captions == one[:3] + two[:2]
  assert [captions[i] for i in shapes_samples.grid_rows(captions, 4)] == one[:2] + two[:2]
  assert [captions[i] for i in shapes_samples.grid_rows(captions, 5)] == one[:3] + two[:2]
  config.num_two_object_captions = 4
  with pytest.raises(ConfigError, match="only 3 distinct two-object captions"):
    shapes_samples.test_captions(config)


def test_likelihood_preference_counts_strict_wins_per_attribute():
  from mmjax.train import shapes_samples
  render = shapes_samples.shapes_render
  captions = ["a small red circle", "a blue square on a black background", "there is a large white star"]
  # Codes name the truth: [colour, shape, size (−1: the caption has none)].
  truth = [(c, s, z) for c, s, z in ((0, 0, 0), (2, 1, -1), (6, 5, 1))]
  codes = np.array(truth)
  assert shapes_samples.word_swaps(captions[1], render.SIZES) is None
  index, variants = shapes_samples.word_swaps(captions[0], render.SHAPES)
  assert index == 0 and variants[3] == "a small red diamond" and len(variants) == len(render.SHAPES)

  def scorer(read_colour=True):
    """−log p = how many attributes of the caption disagree with the codes (colour ignored unless read)."""
    def nll(texts, rows):
      out = []
      for text, row in zip(texts, rows):
        scene = shapes_samples.shapes_oracle.parse_caption(text).objects[0]
        wrong = (scene.shape != render.SHAPES[row[1]]) + (read_colour and scene.colour != render.COLOUR_NAMES[row[0]])
        wrong += row[2] >= 0 and scene.size != render.SIZES[row[2]]
        out.append(float(wrong))
      return np.array(out)
    return nll

  assert shapes_samples.likelihood_preference(captions, codes, scorer()) == {
      "examples": 3, "colour": 1.0, "shape": 1.0, "size": 1.0}
  # A model blind to colour ties every colour word: a tie is not a preference.
  assert shapes_samples.likelihood_preference(captions, codes, scorer(read_colour=False))["colour"] == 0.0


def test_oracle_best_picks_the_candidate_with_most_attributes_right():
  from mmjax.train import shapes_samples
  render = shapes_samples.shapes_render
  size = 32

  def image(colour, shape, object_size="large"):
    return render.render([render.SceneObject(colour, shape, object_size, x=16, y=16)], size)

  blank = render.render([], size)
  captions = ["a large red circle", "a small blue star"]
  candidates = np.stack([
      # Nothing right, colour only, colour and shape (wrong size), everything.
      [blank, image("red", "square", "small"), image("red", "circle", "small"), image("red", "circle")],
      # Everything right comes first; a later all-right candidate does not displace it.
      [image("blue", "star", "small"), blank, image("green", "star", "small"), image("blue", "star", "small")],
  ])
  np.testing.assert_array_equal(shapes_samples.oracle_best(candidates, captions), [3, 0])
  # Without an all-right candidate, the one with the most right wins.
  np.testing.assert_array_equal(shapes_samples.oracle_best(candidates[:1, :3], captions[:1]), [2])


def test_guidance_against_other_shape_words_is_configured_and_checked():
  from mmjax.train import shapes_samples
  captions = ["a small red circle", "a red circle above a blue square"]
  negatives = shapes_samples.negative_captions(captions, "shape")
  assert negatives[0] == ["a small red square", "a small red triangle", "a small red diamond", "a small red cross",
                          "a small red star"]
  assert negatives[1][0] == "a red square above a blue square" and len(negatives[1]) == 5
  assert shapes_samples.negative_captions(captions[:1], "colour") == [[
      f"a small {colour} circle" for colour in ("green", "blue", "yellow", "magenta", "cyan", "white")]]
  config = shapes_demo.get_config().stages.samples
  assert config.guidance_scale is None and not config.guide_against
  settings, record = shapes_samples.sampling_settings(config)
  assert settings.guidance_scale is None and record["guide_against"] == "no caption"
  config.guide_against = "shape"
  with pytest.raises(ConfigError, match="needs config.guidance_scale"):
    shapes_samples.sampling_settings(config)
  config.guidance_scale = 2.0  # a float, as --config.stages.samples.guidance_scale=2 sets it
  settings, record = shapes_samples.sampling_settings(config)
  assert settings.guidance_scale == 2.0 and record["guide_against"] == "shape"
  config.guide_against = "size"
  with pytest.raises(ConfigError, match="expected one of"):
    shapes_samples.sampling_settings(config)
