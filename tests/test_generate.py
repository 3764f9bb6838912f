"""Generation: KV-cache sampling against the full forward, logit filters, guidance, seeds, sharding, CLI."""

import functools
import json
import os
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from mmjax import generate, sharding, zeroshot
from mmjax.configs import common
from mmjax.errors import ConfigError, DataError
from mmjax.input_pipeline import tokenizer as tokenizer_lib
from mmjax.models import attention, clip, dalle, dvae
from mmjax.train import checkpoint

# Six layers: row, column, row, row, row, conv (3×3 window on the 4×4 grid): every attention pattern.
TINY = dict(text_vocab_size=50, text_length=6, image_vocab_size=30, grid_size=4, width=32, num_layers=6,
            num_heads=4, mlp_dim=64, kernel_size=3, remat=False, dtype=jnp.float32)
TEXT_ROWS = 50 + 6
BATCH = 8  # one row per fake CPU device in the sharded test


def key(seed):
  return jax.random.key(seed, impl="rbg")  # threefry compiles slowly on this CPU


@pytest.fixture(scope="module")
def tiny():
  """(model, random params with order-1 logits, text rows in the "dalle" layout, per-row keys)."""
  model = dalle.Dalle(**TINY)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda leaf: rng.normal(scale=0.3, size=leaf.shape).astype(np.float32),
                        dalle.abstract_params(model))
  text = np.tile(np.arange(50, 56, dtype=np.int32), (BATCH, 1))  # pad id = vocab + position
  for row in range(BATCH):
    text[row, :1 + row % 6] = rng.integers(3, 50, 1 + row % 6)  # captions of 1 … 6 words
  # threefry (the CLI's keys): its draws depend on the key alone, not on the batch around it.
  return model, params, text, generate.candidate_keys(np.arange(BATCH))


@pytest.fixture(scope="module")
def sampled(tiny):
  """Plain sampling at temperature 1, with the logits each code was drawn from."""
  model, params, text, keys = tiny
  codes, logits = generate.sample_image_tokens(model, params, text, keys, return_logits=True)
  return np.asarray(codes), np.asarray(logits)


@functools.lru_cache
def _forward(model):
  return jax.jit(model.apply)


def full_image_logits(model, params, text, codes):
  """The full forward's image logits at the positions that predict image codes 0 … N−1."""
  logits = _forward(model)({"params": params}, text, codes)
  return np.asarray(logits)[:, model.text_length - 1:-1, TEXT_ROWS:]


def test_scan_decoding_gives_the_full_forward_logits(tiny, sampled):
  """Prefill + scan over the KV cache: every code was drawn from the logits the full forward gives on the
  same prefix, in a stack with row, column and conv layers (f32: |Δ| ≤ 1e-5 on logits of order 1)."""
  model, params, text, _ = tiny
  assert set(attention.layer_patterns(model.num_layers)) == {"row", "column", "conv"}
  codes, logits = sampled
  assert codes.shape == (BATCH, 16) and codes.dtype == np.int32 and logits.shape == (BATCH, 16, 30)
  full = full_image_logits(model, params, text, codes)
  assert np.abs(full).max() > 1.0  # order-1 logits: the tolerance means something
  np.testing.assert_allclose(logits, full, rtol=0, atol=1e-5)
  # The samples depend on the caption: rows differ, and the logits of different captions differ.
  assert len({tuple(row) for row in codes}) == BATCH
  assert np.abs(full[0, 0] - full[1, 0]).max() > 0.1


def test_unrolled_layers_sample_the_same_codes(tiny, sampled):
  """`decoding_model` (what the CLI samples with) unstacks the scanned layers: same logits, same codes."""
  model, params, text, keys = tiny
  assert model.scan_layers
  unrolled, unstacked = generate.decoding_model(model, params)
  assert not unrolled.scan_layers and "blocks_5" in unstacked and "blocks" not in unstacked
  codes, logits = generate.sample_image_tokens(unrolled, unstacked, text, keys, return_logits=True)
  np.testing.assert_allclose(np.asarray(logits), sampled[1], rtol=0, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(codes), sampled[0])


def test_top_k_and_top_p_keep_exactly_the_right_codes():
  logits = jnp.asarray([[2.0, -1.0, 0.5, 3.0, 1.0], [0.0, 0.0, 0.0, 0.0, 5.0]])
  kept = lambda x: np.isfinite(np.asarray(x))  # noqa: E731
  np.testing.assert_array_equal(kept(generate.filter_top_k(logits, 2)),
                                [[1, 0, 0, 1, 0], [1, 1, 1, 1, 1]])  # ties at the 2nd value are all kept
  np.testing.assert_array_equal(kept(generate.filter_top_k(logits, 1))[0], [0, 0, 0, 1, 0])
  assert kept(generate.filter_top_k(logits, 0)).all() and kept(generate.filter_top_k(logits, 5)).all()
  # Row 0 by probability: 3 → .6236, 2 → .2294, 1 → .0844, 0.5 → .0512, −1 → .0114 (cumulative .6236,
  # .8530, .9374, .9886, 1): the nucleus is the shortest prefix whose mass reaches p.
  for p, expected in ((0.5, [0, 0, 0, 1, 0]), (0.62, [0, 0, 0, 1, 0]), (0.63, [1, 0, 0, 1, 0]),
                      (0.85, [1, 0, 0, 1, 0]), (0.86, [1, 0, 0, 1, 1]), (0.95, [1, 0, 1, 1, 1]),
                      (0.99, [1, 1, 1, 1, 1])):
    np.testing.assert_array_equal(kept(generate.filter_top_p(logits, p))[0], expected, err_msg=f"p={p}")
  # Kept logits are unchanged; against a numpy definition on random rows, for several p and k.
  rng = np.random.default_rng(0)
  random = rng.normal(size=(64, 40)).astype(np.float32)
  for p in (0.1, 0.5, 0.9):
    filtered = np.asarray(generate.filter_top_p(jnp.asarray(random), p))
    for row, out in zip(random, filtered):
      order = np.argsort(-row)
      probs = np.exp(row[order] - row.max()) / np.exp(row - row.max()).sum()
      size = int(np.searchsorted(np.cumsum(probs), p) + 1)  # smallest prefix with mass ≥ p
      assert set(np.flatnonzero(np.isfinite(out))) == set(order[:size])
      np.testing.assert_array_equal(out[order[:size]], row[order[:size]])
  for k in (1, 7, 39):
    filtered = np.asarray(generate.filter_top_k(jnp.asarray(random), k))
    assert all(set(np.flatnonzero(np.isfinite(o))) == set(np.argsort(-r)[:k]) for r, o in zip(random, filtered))


def test_low_temperature_is_argmax_and_draws_follow_the_filters():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(256, 30)).astype(np.float32)
  argmax = np.argmax(logits, axis=-1)
  logits[np.arange(256), argmax] += 0.05  # a gap of ≥ 0.05 = 50 gumbel units at temperature 1e-3
  logits, keys = jnp.asarray(logits), jax.random.split(key(0), 256)
  cold = generate.SamplingSettings(temperature=0.0)
  np.testing.assert_array_equal(generate.sample_logits(logits, keys, cold), argmax)
  np.testing.assert_array_equal(generate.sample_logits(logits, keys, generate.SamplingSettings(1e-3)), argmax)
  hot = np.asarray(generate.sample_logits(logits, keys, generate.SamplingSettings(1.0)))
  assert (hot != argmax).mean() > 0.5  # at temperature 1 most draws from 30 codes are not the argmax
  top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
  drawn = np.asarray(generate.sample_logits(logits, keys, generate.SamplingSettings(top_k=3)))
  assert all(d in t for d, t in zip(drawn, top3)) and (drawn != argmax).mean() > 0.2
  with pytest.raises(ConfigError, match="--top_p"):
    generate.SamplingSettings(top_p=0.0)
  with pytest.raises(ConfigError, match="--temperature"):
    generate.SamplingSettings(temperature=-1.0)


def test_greedy_sampling_is_the_argmax_of_its_own_logits(tiny, sampled):
  model, params, text, keys = tiny
  codes, logits = generate.sample_image_tokens(model, params, text, keys, temperature=0, return_logits=True)
  codes, logits = np.asarray(codes), np.asarray(logits)
  np.testing.assert_array_equal(codes, logits.argmax(-1))
  np.testing.assert_allclose(logits, full_image_logits(model, params, text, codes), rtol=0, atol=1e-5)
  assert (codes != sampled[0]).any()  # temperature-1 samples are not greedy


def test_codes_stay_in_the_image_vocabulary(tiny):
  """A head that strongly prefers text ids still yields image codes, and filtered draws stay in the
  top-k ∩ nucleus of the logits they were drawn from."""
  model, params, text, keys = tiny
  head = dict(params["head"])
  head["bias"] = head["bias"].copy()
  head["bias"][:TEXT_ROWS] += 100.0
  biased = {**params, "head": head}
  codes, logits = generate.sample_image_tokens(model, biased, text, keys, top_k=5, top_p=0.8,
                                               return_logits=True)
  codes, logits = np.asarray(codes), np.asarray(logits)
  assert codes.min() >= 0 and codes.max() < 30
  allowed = np.isfinite(np.asarray(generate.filter_top_p(generate.filter_top_k(jnp.asarray(logits), 5), 0.8)))
  assert np.take_along_axis(allowed, codes[..., None], -1).all()
  assert allowed.sum(-1).min() >= 1 and allowed.sum(-1).max() <= 5


def test_guidance_scale_one_is_unguided_and_guidance_combines_both_captions(tiny, sampled):
  model, params, text, keys = tiny
  codes, logits = sampled
  one_codes, one_logits = generate.sample_image_tokens(model, params, text, keys, guidance_scale=1.0,
                                                       return_logits=True)
  np.testing.assert_array_equal(one_codes, codes)
  np.testing.assert_allclose(one_logits, logits, rtol=0, atol=1e-5)
  # Scale 3 (same compiled sampler: the scale is an argument): uncond + 3·(cond − uncond), where the
  # unconditional caption is every text position's own pad id.
  guided_codes, guided = generate.sample_image_tokens(model, params, text, keys, guidance_scale=3.0,
                                                      return_logits=True)
  guided_codes = np.asarray(guided_codes)
  uncond_text = np.tile(np.arange(50, 56, dtype=np.int32), (BATCH, 1))
  np.testing.assert_array_equal(dalle.unconditional_text(model, BATCH), uncond_text)
  cond = full_image_logits(model, params, text, guided_codes)
  uncond = full_image_logits(model, params, uncond_text, guided_codes)
  np.testing.assert_allclose(guided, uncond + 3.0 * (cond - uncond), rtol=0, atol=5e-5)
  assert (guided_codes != codes).any()


def test_negative_captions_replace_the_unconditional_row(tiny, sampled):
  """Guidance against given captions: neg + s·(cond − neg) per row; the all-pad negative is the default,
  and a negative equal to the caption leaves only the conditional logits (any scale)."""
  model, params, text, keys = tiny
  codes, logits = sampled
  uncond = np.asarray(dalle.unconditional_text(model, BATCH))
  default = generate.sample_image_tokens(model, params, text, keys, guidance_scale=3.0, return_logits=True)
  explicit = generate.sample_image_tokens(model, params, text, keys, guidance_scale=3.0, negative_tokens=uncond,
                                          return_logits=True)
  np.testing.assert_array_equal(explicit[0], default[0])
  same_codes, same_logits = generate.sample_image_tokens(model, params, text, keys, guidance_scale=3.0,
                                                         negative_tokens=text, return_logits=True)
  np.testing.assert_array_equal(same_codes, codes)
  np.testing.assert_allclose(same_logits, logits, rtol=0, atol=1e-4)
  negative = text[::-1].copy()  # each row guided away from another row's caption
  guided_codes, guided = generate.sample_image_tokens(model, params, text, keys, guidance_scale=2.0,
                                                      negative_tokens=negative, return_logits=True)
  guided_codes = np.asarray(guided_codes)
  cond = full_image_logits(model, params, text, guided_codes)
  neg = full_image_logits(model, params, negative, guided_codes)
  np.testing.assert_allclose(guided, neg + 2.0 * (cond - neg), rtol=0, atol=5e-5)
  assert (guided_codes != codes).any()
  with pytest.raises(ConfigError, match="guidance_scale"):
    generate.sample_image_tokens(model, params, text, keys, negative_tokens=negative)
  with pytest.raises(ValueError, match="one negative caption per row"):
    generate.sample_image_tokens(model, params, text, keys, guidance_scale=2.0, negative_tokens=negative[:2])


def test_a_candidate_depends_on_its_seed_not_its_batch(tiny, sampled):
  model, params, text, _ = tiny
  order = np.array([5, 2, 7, 0, 1, 3, 6, 4])
  shuffled = generate.sample_image_tokens(model, params, text[order],
                                          generate.candidate_keys(order), return_logits=True)[0]
  np.testing.assert_array_equal(np.asarray(shuffled), sampled[0][order])


def test_candidates_shard_over_the_devices(tiny, sampled):
  model, params, text, keys = tiny
  mesh = sharding.create_mesh(common.mesh_config(data=-1))
  assert generate.batch_shards(mesh) == 8
  codes, logits = generate.sample_image_tokens(model, params, text, keys, mesh=mesh, return_logits=True)
  # One candidate per device: the scan ran batch-sharded (its outputs come back split over the devices).
  assert codes.sharding.shard_shape(codes.shape) == (1, 16) and len(codes.sharding.device_set) == 8
  assert logits.sharding.shard_shape(logits.shape) == (1, 16, 30)
  np.testing.assert_array_equal(np.asarray(codes), sampled[0])
  np.testing.assert_allclose(np.asarray(logits), sampled[1], rtol=0, atol=1e-5)
  with pytest.raises(ConfigError, match="--batch_size"):
    generate.sample_image_tokens(model, params, text[:6], keys[:6], mesh=mesh)


def test_rerank_keeps_the_best_per_prompt():
  scores = np.array([[0.1, 0.5, 0.3, 0.5], [0.9, -0.2, 0.0, 0.1]])
  np.testing.assert_array_equal(generate.rerank(scores, 2), [[1, 3], [0, 3]])  # ties: lower index first


# ----------------------------------------------------------------------------- the CLI on tiny exports

def _export(directory, init, model_config):
  """Random params of the shapes `init` gives (no compilation), saved as an exported model."""
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda leaf: rng.normal(scale=0.3, size=leaf.shape).astype(np.float32),
                        nn.unbox(jax.eval_shape(init, key(0))["params"]))
  checkpoint.save_model(directory, params, model_config)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
  """A tiny workdir: tokenizer/spm.model, dalle/, dvae/ (8 px images of a 4×4 grid), clip/ (16 px)."""
  root = tmp_path_factory.mktemp("generate")
  spm = tokenizer_lib.train_tokenizer(tokenizer_lib.cupl_sentences()[:2000], str(root / "tokenizer" / "spm"), 128)
  tok = tokenizer_lib.Tokenizer(spm)
  transformer = dalle.Dalle(text_vocab_size=128, text_length=8, image_vocab_size=16, grid_size=4, width=32,
                            num_layers=2, num_heads=2, mlp_dim=64, kernel_size=3, remat=False, dtype=jnp.float32)
  _export(root / "dalle", lambda r: transformer.init(r, np.zeros((1, 8), np.int32), np.zeros((1, 16), np.int32)),
          dalle.model_config(transformer))
  autoencoder = dvae.DVAE(n_hid=8, n_blk_per_group=1, group_count=2, vocab_size=16, n_init=8, dtype=jnp.float32)
  images = np.zeros((1, 8, 8, 3), np.float32)
  _export(root / "dvae", lambda r: autoencoder.init(r, images, temperature=1.0, rng=None, deterministic=True),
          dvae.model_config(autoencoder, image_size=8))
  towers = clip.CLIP(embed_dim=16, image_size=16, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2,
                     vision_mlp_dim=64, context_length=16, vocab_size=128, text_width=32, text_layers=1,
                     text_heads=2, text_mlp_dim=64, dtype=jnp.float32)
  clip_inputs = (np.zeros((1, 16, 16, 3), np.float32), np.zeros((1, 16), np.int32))
  _export(root / "clip", lambda r: towers.init(r, *clip_inputs), clip.model_config(towers))
  zeroshot.save_tokenizer(str(root / "clip"), tok)
  return root


def _run_cli(*args):
  start = time.perf_counter()
  result = subprocess.run([sys.executable, "-m", "mmjax.generate", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": os.getcwd()})
  return result, time.perf_counter() - start


@pytest.mark.slow  # a fresh interpreter imports TensorFlow and compiles: ~40 s on the shared 2-core CPU
def test_cli_writes_a_reranked_grid_and_json(exports, tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a blue square\n\na green triangle\n")
  output = tmp_path / "out" / "grid.png"
  result, seconds = _run_cli(f"--dalle={exports / 'dalle'}", f"--dvae={exports / 'dvae'}",
                             f"--clip={exports / 'clip'}", "--prompt=a red circle above a blue square",
                             f"--prompts_file={prompts}", "--num_candidates=4", "--top=2", "--batch_size=8",
                             "--top_k=8", "--top_p=0.9", "--seed=10", f"--output={output}", "--guidance_scale=2",
                             "--negative_prompt=a green circle")
  assert result.returncode == 0, result.stderr[-3000:]
  assert seconds < 90  # imports, loading, compiling, sampling: ~40 s on the shared 2-core CPU at load 9
  record = json.loads((tmp_path / "out" / "grid.json").read_text())
  assert [p["caption"] for p in record["prompts"]] == ["a red circle above a blue square", "a blue square",
                                                        "a green triangle"]
  assert record["reranked"] and record["top_k"] == 8 and record["top_p"] == 0.9
  assert record["guidance_scale"] == 2.0
  assert all(p["negative_prompts"] == ["a green circle"] for p in record["prompts"])
  for p, prompt in enumerate(record["prompts"]):
    seeds = [c["seed"] for c in prompt["candidates"]]
    assert seeds == list(range(10 + 4 * p, 14 + 4 * p))
    scores = [c["score"] for c in prompt["candidates"]]
    assert all(-1 <= s <= 1 for s in scores)
    assert len(prompt["kept"]) == 2
    assert [k["score"] for k in prompt["kept"]] == sorted(scores, reverse=True)[:2]
    assert [k["seed"] for k in prompt["kept"]] == [seeds[k["candidate"]] for k in prompt["kept"]]
  grid = np.asarray(Image.open(output))
  # Three rows of two 96 px cells (8 px images enlarged ×12) under their captions.
  assert grid.shape[1] == 2 * (96 + 4) + 4 and grid.shape[0] > 3 * 96
  assert "skipped 1 blank lines" in result.stderr


def test_without_clip_the_first_candidates_are_kept(exports, tmp_path, caplog):
  """The Generator API as the CLI drives it, without --clip and with guidance; bad counts name the flag."""
  generator = generate.Generator(str(exports / "dalle"), str(exports / "dvae"))
  assert not generator.model.scan_layers and generator.tokenizer.vocab_size == 128
  settings = generate.SamplingSettings(guidance_scale=2.0)
  with caplog.at_level("INFO"):
    samples = generator.generate(["a red circle"], num_candidates=8, top=3, settings=settings, seed=5,
                                 batch_size=8)
  assert "not reranked" in caplog.text
  assert samples.scores is None and samples.codes.shape == (1, 8, 16) and samples.images.shape == (1, 8, 8, 8, 3)
  assert samples.codes.max() < 16 and len({tuple(c) for c in samples.codes[0]}) == 8
  np.testing.assert_array_equal(samples.kept, [[0, 1, 2]])
  np.testing.assert_array_equal(samples.seeds, [np.arange(5, 13)])
  generate.write_outputs(samples, str(tmp_path / "plain.png"), str(tmp_path / "plain.json"),
                         {"guidance_scale": 2.0})
  record = json.loads((tmp_path / "plain.json").read_text())
  assert not record["reranked"] and record["guidance_scale"] == 2.0
  assert [(k["candidate"], k["seed"], k["score"]) for k in record["prompts"][0]["kept"]] == [
      (0, 5, None), (1, 6, None), (2, 7, None)]
  assert Image.open(tmp_path / "plain.png").size[0] == 3 * (96 + 4) + 4
  # Negative prompts: candidate j of a prompt is guided away from its (j mod count)-th negative; the
  # record keeps them. Guided against the prompt itself, candidates are the unguided ones.
  negatives = [["a red square", "a red star"], ["a blue circle"]]
  guided = generator.generate(["a red circle", "a blue star"], num_candidates=4, top=2, settings=settings,
                              seed=5, batch_size=8, negative_prompts=negatives)
  assert guided.negative_prompts == negatives
  sampled_alone = generator.generate(["a red circle"], num_candidates=4, top=2, settings=settings, seed=5,
                                     batch_size=8, negative_prompts=[["a red square", "a red star"]])
  np.testing.assert_array_equal(sampled_alone.codes[0], guided.codes[0])
  generate.write_outputs(guided, str(tmp_path / "neg.png"), str(tmp_path / "neg.json"), {})
  assert [p["negative_prompts"] for p in json.loads((tmp_path / "neg.json").read_text())["prompts"]] == negatives
  unguided = generator.generate(["a red circle"], num_candidates=8, top=3, seed=5, batch_size=8)
  self_guided = generator.generate(["a red circle"], num_candidates=8, top=3, settings=settings, seed=5,
                                   batch_size=8, negative_prompts=[["a red circle"]])
  np.testing.assert_array_equal(self_guided.codes, unguided.codes)
  with pytest.raises(ConfigError, match="each of the 2 prompts"):
    generator.generate(["a", "b"], num_candidates=8, top=3, settings=settings, batch_size=8,
                       negative_prompts=[["c"]])
  with pytest.raises(ConfigError, match="guidance_scale"):
    generator.generate(["a"], num_candidates=8, top=3, batch_size=8, negative_prompts=[["c"]])
  with pytest.raises(ConfigError, match="--top=9"):
    generate.check_counts(num_candidates=8, top=9, batch_size=8)
  with pytest.raises(ConfigError, match="--batch_size=4"):
    generator.generate(["a red circle"], num_candidates=8, top=3, batch_size=4)  # 8 devices


def test_image_nll_is_the_teacher_forced_negative_log_likelihood(exports):
  """Generator.image_nll against log-softmax of one plain forward pass, for 3 rows (padded to 8 devices)."""
  generator = generate.Generator(str(exports / "dalle"), str(exports / "dvae"))
  captions = ["a red circle", "a blue square", "a red circle"]
  codes = np.random.default_rng(0).integers(0, 16, (3, 16))
  codes[2] = codes[0]   # rows 0 and 2: the same caption and codes
  nll = generator.image_nll(captions, codes)
  model, params = generator.model, jax.device_get(generator.params)
  text = np.asarray(generator.tokenizer.tokenize(captions, "dalle", 8), np.int32)
  logits = np.asarray(model.apply({"params": params}, text, codes.astype(np.int32)), np.float64)
  image_logits = logits[:, 7:-1, model.text_rows:]   # the position before each code predicts it
  log_probs = image_logits - np.log(np.exp(image_logits).sum(-1, keepdims=True))
  expected = -np.take_along_axis(log_probs, codes[..., None], -1)[..., 0].sum(-1)
  assert nll.shape == (3,)
  np.testing.assert_allclose(nll, expected, rtol=1e-5)
  assert nll[0] == pytest.approx(nll[2], rel=1e-6) and nll[0] != pytest.approx(nll[1])


def test_training_samples_hook(exports, tmp_path, caplog):
  """The DALL·E trainer's hook: sharded params and host-local caption rows → a captioned PNG."""
  mesh = sharding.create_mesh(common.mesh_config(data=-1))
  model, params, _ = generate.load_dalle(str(exports / "dalle"), mesh)
  tok = tokenizer_lib.Tokenizer(exports / "tokenizer" / "spm.model")
  text = tok.tokenize(["a red circle", "a blue square"] * 6, "dalle", model.text_length)  # a batch of 12
  config = ml_collections.ConfigDict({
      "mesh": common.mesh_config(data=-1), "logical_axis_rules": common.DEFAULT_LOGICAL_AXIS_RULES,
      "tokenizer": {"model_path": str(exports / "tokenizer" / "spm.model")},
      "sample_dvae": str(exports / "dvae"), "sample_rows": 3})
  path = tmp_path / "samples" / "step_0000010.png"
  codes = generate.training_samples(config=config, model=model, params=params, text_tokens=text, seed=10,
                                    path=str(path))
  assert codes.shape == (8, 16) and 0 <= codes.min() and codes.max() < 16  # 3 rows rounded up to 8 devices
  assert len({tuple(c) for c in codes}) == 8
  assert Image.open(path).size[0] == 8 * (128 + 4) + 4  # one row of 8 captioned 128 px cells
  config.sample_dvae = str(tmp_path / "no_dvae")
  with caplog.at_level("WARNING"):
    assert generate.training_samples(config=config, model=model, params=params, text_tokens=text, seed=10,
                                     path=str(path)) is None
  assert "no_dvae" in caplog.text


def test_tokenizer_lookup(exports, tmp_path):
  assert generate.dalle_tokenizer_path(str(exports / "dalle")) == str(exports / "tokenizer" / "spm.model")
  assert generate.dalle_tokenizer_path(str(exports / "clip")).endswith("clip/spm.model")  # tokenizer.json
  with pytest.raises(DataError, match="--tokenizer=PATH"):
    generate.dalle_tokenizer_path(str(tmp_path / "elsewhere" / "dalle"))
  with pytest.raises(DataError, match="--tokenizer=.*missing.model"):
    generate.dalle_tokenizer_path(str(exports / "dalle"), str(exports / "missing.model"))
