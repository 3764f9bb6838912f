r"""DALL·E train step on this CPU, by attention kernel and layer layout: dalle_shapes.py:shapes' model.

  .venv/bin/python bench/dalle_step.py                  # every variant, 3 timed repeats of 10 steps
  .venv/bin/python bench/dalle_step.py --variants=dense_scan,axial_unrolled --repeats=5

Variants (the same config otherwise: 4 layers × 64, 32 text + 16×16 image tokens, batch 32, f32):
  dense_scan        "dense" attention (the [L, L] product under each layer's mask), layers in an nn.scan
  dense_unrolled    "dense", layers unrolled
  axial_unrolled    "axial" (row and column layers over their own keys), unrolled: what the config runs
The step is the trainer's own (`mmjax.train.dalle.jit_train_step`: forward, backward, clipping,
AdamW, EMA) on one device with random token rows, each variant warmed up (compiled) once and the
variants timed in turn each repeat. Steps/s from the best repeat, median alongside. As `mmjax.main`
does on the CPU, freed memory is kept for reuse (mmjax/host_memory.py). Writes bench/results/dalle_step.json.
"""

import os
import pathlib
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout

from mmjax import host_memory  # noqa: E402

HOST_MEMORY_KEPT = host_memory.keep_freed_memory()

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import timing  # noqa: E402
from mmjax import sharding  # noqa: E402
from mmjax.configs import dalle_shapes  # noqa: E402
from mmjax.train import dalle as trainer  # noqa: E402

VARIANTS = {"dense_scan": ("dense", True), "dense_unrolled": ("dense", False), "axial_unrolled": ("axial", False)}
RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "dalle_step.json"
STEPS_PER_CALL = 10

_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), f"Which of {list(VARIANTS)} to time.")
_REPEATS = flags.DEFINE_integer("repeats", 3, f"Timed repeats of {STEPS_PER_CALL} steps per variant.")
_OUTPUT = flags.DEFINE_string("output", str(RESULTS), "Where to write the JSON results.")


def step_runner(kernel, scan_layers):
  """A callable running STEPS_PER_CALL train steps of the variant (state donated from call to call)."""
  config = dalle_shapes.get_config("shapes")
  config.model.update(attention_kernel=kernel, scan_layers=scan_layers)
  config.mesh.ici.data = 1
  mesh = sharding.create_mesh(config.mesh, devices=jax.devices()[:1])
  rules = config.logical_axis_rules
  model = trainer.create_model(config)
  _, shardings, init_fn, rng = trainer.abstract_state(config, model, mesh)
  step = trainer.jit_train_step(config, shardings, mesh)
  rows = np.random.default_rng(0)
  batch_size, spec = config.data.global_batch, config.model
  local = {"text_tokens": rows.integers(0, spec.text_vocab_size, (batch_size, spec.text_length)),
           "image_tokens": rows.integers(0, spec.image_vocab_size, (batch_size, spec.grid_size ** 2))}
  with sharding.mesh_and_rules(mesh, rules):
    holder = {"state": jax.jit(init_fn, out_shardings=shardings)(rng)}
    batch = sharding.make_global_batch({k: v.astype(np.int32) for k, v in local.items()}, mesh, rules)

  def run():
    with sharding.mesh_and_rules(mesh, rules):
      for _ in range(STEPS_PER_CALL):
        holder["state"], scalars = step(holder["state"], batch)
    return jax.block_until_ready(scalars)
  return run


def main(argv):
  del argv
  names = timing.select_cases(_VARIANTS.value, VARIANTS, flag="--variants")
  load_before = timing.load_average()
  runners = {name: step_runner(*VARIANTS[name]) for name in names}
  for run in runners.values():
    run()  # compile and warm up
  times = timing.alternating(runners, _REPEATS.value)
  rows = []
  for name in names:
    best, median = timing.rates(STEPS_PER_CALL, times[name])
    rows.append({"variant": name, "kernel": VARIANTS[name][0], "scan_layers": VARIANTS[name][1],
                 "steps_per_s": best, "median_steps_per_s": median, "times_s": times[name]})
  baseline = rows[0]["steps_per_s"]
  table = timing.markdown_table(
      ["variant", "steps/s (median)", f"vs {rows[0]['variant']}"],
      [[r["variant"], f"{r['steps_per_s']:.3g} ({r['median_steps_per_s']:.3g})", f"{r['steps_per_s'] / baseline:.2f}×"]
       for r in rows])
  timing.finish("dalle_step.py", table,
                f"dalle_shapes.py:shapes train step, batch 32, f32, best of {_REPEATS.value} × {STEPS_PER_CALL} steps.",
                load_before, _OUTPUT.value, rows, malloc_keeps_freed_memory=HOST_MEMORY_KEPT)


if __name__ == "__main__":
  app.run(main)
