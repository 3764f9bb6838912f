r"""DALL·E image-token sampling on this CPU: the KV cache (mmjax.generate) vs recomputing the prefix.

  .venv/bin/python bench/sampling.py                        # tiny and small, 256 image tokens each
  .venv/bin/python bench/sampling.py --cases=tiny --repeats=3 --full_steps=32

Each sampler is one jitted call on the same random weights, keys and settings (temperature 1):
  kv_cache      `generate.sample_image_tokens` on `generate.decoding_model` (layers unrolled, as
                mmjax.generate runs it): prefill the caption in one decode call, then a `lax.scan`
                over the N image positions, one token per step against the KV cache.
  kv_cache_scanned  the same on the training layout (layers in an nn.scan), for comparison.
  full_forward  a `lax.scan` whose every step runs the whole model (`Dalle.__call__`) on the caption
                and the codes so far (later positions zero; causal masks make them irrelevant) and
                samples the next code from its logits. Shapes are fixed under jit, so each step
                costs a full L = T + N forward whatever the position: its rate is measured over the
                first --full_steps positions (the whole N would take minutes) and is the same for any
                number of steps.
All draw code i with the same key, so the codes they agree on are reported as a check. tokens/s =
batch · positions / seconds of the best repeat after a warm-up (compilation); medians alongside.
Prints a markdown table and writes bench/results/sampling.json (timing: bench/timing.py).
"""

import os
import pathlib
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout

from mmjax import host_memory  # noqa: E402

# As `python -m mmjax.main` does on the CPU: freed memory is kept for reuse (mmjax/host_memory.py).
HOST_MEMORY_KEPT = host_memory.keep_freed_memory()

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import timing  # noqa: E402
from mmjax import generate  # noqa: E402
from mmjax.models import attention, dalle  # noqa: E402

# Both at a 16×16 grid (256 image tokens). tiny is dalle_shapes.py's earlier 6 × 128 transformer
# (it is 4 × 64 now); small is wider and deeper.
CASES = {
    "tiny": dict(text_vocab_size=1024, text_length=32, image_vocab_size=512, grid_size=16, width=128,
                 num_layers=6, num_heads=4, mlp_dim=512, kernel_size=5),
    "small": dict(text_vocab_size=4096, text_length=64, image_vocab_size=2048, grid_size=16, width=256,
                  num_layers=8, num_heads=8, mlp_dim=1024, kernel_size=7),
}
RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "sampling.json"

_CASES = flags.DEFINE_list("cases", list(CASES), f"Which of {list(CASES)} to run.")
_BATCH = flags.DEFINE_integer("batch", 4, "Candidates sampled at once.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed repeats per sampler (after one warm-up).")
_FULL_STEPS = flags.DEFINE_integer("full_steps", 16, "Positions the full-forward sampler is timed over.")
_OUTPUT = flags.DEFINE_string("output", str(RESULTS), "Where to write the JSON results.")


def full_forward_sampler(model, settings, steps):
  """Jitted (params, text, keys) → codes [B, steps], one full forward per code."""
  def sample(params, text, keys):
    def step(image, position):
      logits = model.apply({"params": params}, text, image)
      logits = jax.lax.dynamic_index_in_dim(logits, model.text_length - 1 + position, axis=1, keepdims=False)
      step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, position)
      codes = generate.sample_logits(logits[:, model.text_rows:], step_keys, settings)
      return image.at[:, position].set(codes), None
    image = jnp.zeros((text.shape[0], model.image_length), jnp.int32)
    image, _ = jax.lax.scan(step, image, jnp.arange(steps, dtype=jnp.int32))
    return image[:, :steps]
  return jax.jit(sample)


def timed(fn, repeats):
  """(output as numpy, [seconds]) of `repeats` calls after a warm-up (compilation)."""
  out, times = timing.repeat(fn, repeats)
  return np.asarray(out), times


def rate_fields(sampler, tokens, times):
  best, median = timing.rates(tokens, times)
  return {f"{sampler}_tokens_per_s": best, f"{sampler}_median_tokens_per_s": median}


def bench_case(name, fields, batch, repeats, full_steps):
  scanned_model = dalle.Dalle(**fields, remat=False, dtype=jnp.float32)
  rng = np.random.default_rng(0)
  scanned_params = jax.tree.map(lambda leaf: jnp.asarray(rng.normal(scale=0.05, size=leaf.shape), jnp.float32),
                                dalle.abstract_params(scanned_model))
  model, params = generate.decoding_model(scanned_model, scanned_params)
  text = np.tile(np.arange(model.text_vocab_size, model.text_rows, dtype=np.int32), (batch, 1))
  text[:, :12] = rng.integers(3, model.text_vocab_size - 1, (batch, 12))  # a 12-token caption
  keys = generate.candidate_keys(np.arange(batch))
  settings = generate.SamplingSettings()
  cached, cached_times = timed(
      lambda: generate.sample_image_tokens(model, params, text, keys).block_until_ready(), repeats)
  scanned, scanned_times = timed(
      lambda: generate.sample_image_tokens(scanned_model, scanned_params, text, keys).block_until_ready(), repeats)
  full = full_forward_sampler(model, settings, full_steps)
  recomputed, full_times = timed(lambda: full(params, text, keys).block_until_ready(), repeats)
  n = model.image_length
  row = {
      "case": name, **{k: fields[k] for k in ("width", "num_layers", "num_heads", "text_length", "grid_size")},
      "image_tokens": n, "sequence_length": model.sequence_length, "batch": batch,
      "patterns": list(attention.layer_patterns(model.num_layers)),
      "params": int(sum(x.size for x in jax.tree.leaves(params))),
      "kv_cache_positions": n, "full_forward_positions": full_steps,
      **rate_fields("kv_cache", batch * n, cached_times),
      **rate_fields("kv_cache_scanned", batch * n, scanned_times),
      **rate_fields("full_forward", batch * full_steps, full_times),
      "kv_cache_times_s": cached_times, "kv_cache_scanned_times_s": scanned_times,
      "full_forward_times_s": full_times,
      "codes_agreeing": float(np.mean(cached[:, :full_steps] == recomputed)),
      "codes_agreeing_scanned": float(np.mean(cached == scanned)),
  }
  row["speedup"] = row["kv_cache_tokens_per_s"] / row["full_forward_tokens_per_s"]
  print(f"{name}: kv cache {row['kv_cache_tokens_per_s']:.4g} tok/s (scanned layers "
        f"{row['kv_cache_scanned_tokens_per_s']:.4g}), full forward "
        f"{row['full_forward_tokens_per_s']:.4g} tok/s, {row['speedup']:.1f}× (codes agreeing "
        f"{row['codes_agreeing']:.3f})", flush=True)
  return row


def table(rows):
  headers = ["case", "width × layers (heads)", "T + N", "params", "batch", "KV cache tok/s (median)",
             "KV cache, scanned layers", "full forward tok/s (median)", "speedup"]
  return timing.markdown_table(headers, [
      [r["case"], f"{r['width']} × {r['num_layers']} ({r['num_heads']})", f"{r['text_length']} + {r['image_tokens']}",
       f"{r['params'] / 1e6:.2f}M", r["batch"],
       f"{r['kv_cache_tokens_per_s']:.4g} ({r['kv_cache_median_tokens_per_s']:.4g})",
       f"{r['kv_cache_scanned_tokens_per_s']:.4g} ({r['kv_cache_scanned_median_tokens_per_s']:.4g})",
       f"{r['full_forward_tokens_per_s']:.4g} ({r['full_forward_median_tokens_per_s']:.4g})", f"{r['speedup']:.1f}×"]
      for r in rows])


def main(argv):
  del argv
  cases = timing.select_cases(_CASES.value, CASES)
  load_before = timing.load_average()
  rows = [bench_case(name, CASES[name], _BATCH.value, _REPEATS.value, _FULL_STEPS.value) for name in cases]
  timing.finish("sampling.py", table(rows),
                f"f32, temperature 1; tokens/s from the best of {_REPEATS.value} repeats (median in brackets); "
                f"the KV cache over all N positions (prefill included), the full forward over the first "
                f"{_FULL_STEPS.value}.", load_before, _OUTPUT.value, rows,
                malloc_keeps_freed_memory=HOST_MEMORY_KEPT)


if __name__ == "__main__":
  app.run(main)
