r"""dVAE encode/decode throughput on this CPU: mmjax (JAX, jit, f32) vs OpenAI's dall_e (PyTorch).

  .venv/bin/python bench/dvae.py                      # both sizes, 3 timed repeats
  .venv/bin/python bench/dvae.py --cases=small --repeats=5

Both frameworks run in this process on the same random weights (dall_e's, converted with
mmjax.tools.convert_openai_dvae) and the same inputs; outputs are checked to agree first. Each
call is warmed up once (JAX compiles there), then the repeats (each at least --repeat_seconds of
back-to-back calls) alternate JAX and PyTorch so both see the same background load; images/s
comes from the best repeat (noise from other processes only ever adds time) and the median is
reported next to it. PyTorch keeps its default thread count. Prints a markdown table and writes
bench/results/dvae.json (timing: bench/timing.py).
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
import torch  # noqa: E402
from dall_e import Decoder as TorchDecoder, Encoder as TorchEncoder  # noqa: E402

from bench import timing  # noqa: E402
from mmjax.models import dvae  # noqa: E402
from mmjax.tools import convert_openai_dvae  # noqa: E402

# name: (n_hid, vocab_size, image_size, batch)
CASES = {
    "small": (64, 512, 64, 8),
    "full": (256, 8192, 256, 1),
}
RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "dvae.json"

_CASES = flags.DEFINE_list("cases", list(CASES), f"Which of {list(CASES)} to run.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats per call (after one warm-up).")
_REPEAT_SECONDS = flags.DEFINE_float("repeat_seconds", 1.0, "Each timed repeat calls each contender back to back "
                                     "for at least this long (bench/timing.py).")
_OUTPUT = flags.DEFINE_string("output", str(RESULTS), "Where to write the JSON results.")


def torch_models(n_hid, vocab_size, seed=0):
  torch.manual_seed(seed)
  encoder = TorchEncoder(n_hid=n_hid, vocab_size=vocab_size).eval()
  decoder = TorchDecoder(n_hid=n_hid, vocab_size=vocab_size).eval()
  with torch.no_grad():  # dall_e initialises biases to zero; random ones exercise them too
    for module in (encoder, decoder):
      for name, param in module.named_parameters():
        if name.endswith(".b"):
          param.normal_(std=0.05)
  return encoder, decoder


def state_dict(module):
  return {k: v.numpy() for k, v in module.state_dict().items()}


def bench_case(name, n_hid, vocab_size, image_size, batch, repeats):
  torch_encoder, torch_decoder = torch_models(n_hid, vocab_size)
  params, config = convert_openai_dvae.convert(state_dict(torch_encoder), state_dict(torch_decoder))
  model = dvae.from_model_config(config, dtype="float32")
  encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=dvae.DVAE.encode))
  decode = jax.jit(lambda p, c: model.apply({"params": p}, c, method=dvae.DVAE.decode))
  params = jax.device_put(params)

  rng = np.random.default_rng(0)
  images = rng.uniform(0.1, 0.9, (batch, image_size, image_size, 3)).astype(np.float32)
  grid = image_size // 8
  codes = np.eye(vocab_size, dtype=np.float32)[rng.integers(0, vocab_size, (batch, grid, grid))]
  images_jax, codes_jax = jnp.asarray(images), jnp.asarray(codes)
  images_torch = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
  codes_torch = torch.from_numpy(np.ascontiguousarray(codes.transpose(0, 3, 1, 2)))

  calls = {
      "encode": (lambda: encode(params, images_jax).block_until_ready(),
                 lambda: torch_encoder(images_torch)),
      "decode": (lambda: decode(params, codes_jax).block_until_ready(),
                 lambda: torch_decoder(codes_torch)),
  }
  rows = []
  with torch.inference_mode():
    for call, (jax_fn, torch_fn) in calls.items():
      jax_out, torch_out = np.asarray(jax_fn()), torch_fn().numpy().transpose(0, 2, 3, 1)  # warm-up
      rel_error = float(np.abs(jax_out - torch_out).max() / np.abs(torch_out).max())
      times = timing.alternating({"jax": jax_fn, "torch": torch_fn}, repeats, _REPEAT_SECONDS.value)
      jax_times, torch_times = times["jax"], times["torch"]
      jax_best, jax_median = timing.rates(batch, jax_times)
      torch_best, torch_median = timing.rates(batch, torch_times)
      row = {
          "case": name, "call": call, "n_hid": n_hid, "vocab_size": vocab_size, "image_size": image_size,
          "batch": batch, "max_rel_error": rel_error,
          "jax_images_per_s": jax_best, "torch_images_per_s": torch_best,
          "jax_median_images_per_s": jax_median, "torch_median_images_per_s": torch_median,
          "jax_times_s": jax_times, "torch_times_s": torch_times,
      }
      row["ratio"] = row["jax_images_per_s"] / row["torch_images_per_s"]
      rows.append(row)
      print(f"{name} {call}: jax {row['jax_images_per_s']:.3g} img/s, torch {row['torch_images_per_s']:.3g} "
            f"img/s, ratio {row['ratio']:.2f} (max rel error {rel_error:.1e})", flush=True)
  return rows


def table(rows):
  headers = ["case", "call", "n_hid", "vocab", "image", "batch", "JAX img/s (median)", "PyTorch img/s (median)",
             "JAX/PyTorch"]
  return timing.markdown_table(headers, [
      [r["case"], r["call"], r["n_hid"], r["vocab_size"], r["image_size"], r["batch"],
       f"{r['jax_images_per_s']:.3g} ({r['jax_median_images_per_s']:.3g})",
       f"{r['torch_images_per_s']:.3g} ({r['torch_median_images_per_s']:.3g})", f"{r['ratio']:.2f}"]
      for r in rows])


def main(argv):
  del argv
  cases = timing.select_cases(_CASES.value, CASES)
  load_before = timing.load_average()
  rows = []
  for name in cases:
    rows.extend(bench_case(name, *CASES[name], repeats=_REPEATS.value))
  threads = torch.get_num_threads()
  timing.finish("dvae.py", table(rows),
                f"images/s from the best of {_REPEATS.value} repeats (median in brackets); torch threads {threads}.",
                load_before, _OUTPUT.value, rows, torch_threads=threads, torch=torch.__version__,
                malloc_keeps_freed_memory=HOST_MEMORY_KEPT)


if __name__ == "__main__":
  app.run(main)
