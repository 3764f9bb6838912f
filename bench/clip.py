r"""CLIP on this CPU: train-step pairs/s and encoder images/s, texts/s, mmjax (JAX) vs OpenAI's code (PyTorch).

  .venv/bin/python bench/clip.py                          # tiny and small, 3 timed repeats
  .venv/bin/python bench/clip.py --cases=tiny --repeats=5

Cases (f32 in both frameworks):
  tiny   clip_shapes.py:shapes' towers at its training batch, read from the config (today 32 px,
         patch 4, width 64, 2 layers, 2 heads, text length 24, vocab 128, embed 64; batch 128).
  small  ViT-B/32's shapes (224 px, patch 32, 12 × 768 vision, 12 × 512 text, context 77, vocab
         49,408, embed 512; ≈151M parameters) at batch 8.

The PyTorch model is clip-anytorch's `clip/model.py` (OpenAI's code, loaded by path: `import clip`
needs torchvision); its random weights are converted with mmjax.tools.convert_openai_clip, so both
run the same weights on the same batch. Each contender is warmed up once (JAX compiles there), the
first outputs are compared (embeddings; the first train step's loss), then the repeats alternate
JAX and PyTorch so both see the same background load; each repeat calls one contender back to back
for at least --repeat_seconds (1 s: a single tiny train step, ~0.1 s, mostly timed thread pools
waking up); rates come from the best repeat (median alongside). PyTorch runs at its default
thread count and, alternating with it, on one thread: on a machine shared with other processes
its OpenMP workers spin-wait for each other and two threads were measured 30× slower than one
(tiny image encoder, load average 6 on 2 cores), which would flatter JAX. The ratio is against the faster of the two; both are in the table and JSON.

Train step, JAX: the real one, `mmjax.train.clip.train_step` (jitted, state donated) on a one-device
mesh with the clip_vit_b32 recipe: both towers, the contrastive loss (the shard_map'd one, over one
shard), value_and_grad, AdamW (β2 0.98, ε 1e-6, weight decay 0.2 off gains/biases/embeddings), the
logit-scale clamp, the EMA of the params and the gradient norm. PyTorch does the same work: the
same symmetric cross-entropy on logit_scale · cos, loss.backward(), torch.optim.AdamW (fused, its
fastest CPU path, with the same decay groups), the clamp, the EMA (`_foreach_lerp_`) and the norm.
Train matmuls: the products that train step multiplies, alone (bench/matmul_floor.py), in JAX (one
jitted call per product group) and in PyTorch (eager): the floor under each framework's step. At the
tiny size JAX's per-call dispatch dominates it.
Prints a markdown table, the reproduce command and the load average; writes bench/results/clip.json.
"""

import os
import pathlib
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
BENCH_DIR = pathlib.Path(__file__).resolve().parent
# This file is named clip.py: keep its folder off the path so `clip` finds clip-anytorch.
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != BENCH_DIR]
sys.path.insert(0, str(BENCH_DIR.parent))  # run from a checkout

from mmjax import host_memory  # noqa: E402

# As `python -m mmjax.main` does: freed memory is kept for reuse (see mmjax/host_memory.py); it
# applies to the whole process, PyTorch included.
HOST_MEMORY_KEPT = host_memory.keep_freed_memory()

import functools  # noqa: E402
import importlib.machinery  # noqa: E402
import importlib.util  # noqa: E402
import math  # noqa: E402

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench import matmul_floor, timing  # noqa: E402
from mmjax import sharding  # noqa: E402
from mmjax.configs import clip_shapes, clip_vit_b32  # noqa: E402
from mmjax.models import clip  # noqa: E402
from mmjax.tools import convert_openai_clip  # noqa: E402
from mmjax.train import clip as trainer  # noqa: E402
from mmjax.train import state as state_lib  # noqa: E402


def clip_shapes_case():
  """clip_shapes.py:shapes' towers and training batch, as clip-anytorch CLIP sizes."""
  config = clip_shapes.get_config("shapes")
  model = config.model
  sizes = dict(embed_dim=model.embed_dim, image_resolution=model.image_size, vision_layers=model.vision_layers,
               vision_width=model.vision_width, vision_patch_size=model.patch_size,
               context_length=model.context_length, vocab_size=model.vocab_size,
               transformer_width=model.text_width, transformer_heads=model.text_heads,
               transformer_layers=model.text_layers)
  return sizes, model.vision_heads, config.data.global_batch, model.scan_layers


# name: clip-anytorch CLIP sizes, vision heads, batch, scan_layers of the config the case comes from.
CASES = {
    "tiny": clip_shapes_case(),
    "small": (dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                   vision_patch_size=32, context_length=77, vocab_size=49408, transformer_width=512,
                   transformer_heads=8, transformer_layers=12), 12, 8, True),
}
CALLS = ("train_step", "encode_image", "encode_text", "train_matmuls")
UNITS = {"train_step": "pairs", "encode_image": "images", "encode_text": "texts", "train_matmuls": "pairs"}
RESULTS = BENCH_DIR / "results" / "clip.json"
LEARNING_RATE = 1e-4
DEFAULT_TORCH_THREADS = torch.get_num_threads()

_CASES = flags.DEFINE_list("cases", list(CASES), f"Which of {list(CASES)} to run.")
_CALLS = flags.DEFINE_list("calls", list(CALLS), f"Which of {list(CALLS)} to time.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats per call (after one warm-up).")
_SCAN_LAYERS = flags.DEFINE_enum("scan_layers", "config", ["config", "true", "false"],
                                 "JAX layers in an nn.scan: as the case's config (tiny: unrolled as "
                                 "clip_shapes.py, small: scanned as clip_vit_b32.py), or forced.")
_REPEAT_SECONDS = flags.DEFINE_float("repeat_seconds", 1.0,
                                     "Each timed repeat calls each contender back to back for at least "
                                     "this long (the count is set from JAX's warmed-up call; bench/timing.py).")
_OUTPUT = flags.DEFINE_string("output", str(RESULTS), "Where to write the JSON results.")


# ----------------------------------------------------------------------------- PyTorch side

def reference_module():
  """clip-anytorch's clip/model.py, loaded by path (its package __init__ imports torchvision)."""
  spec = importlib.machinery.PathFinder.find_spec("clip")
  if spec is None or not spec.submodule_search_locations:
    raise app.UsageError("bench/clip.py needs clip-anytorch (its clip/model.py) installed in the venv")
  path = os.path.join(list(spec.submodule_search_locations)[0], "model.py")
  module_spec = importlib.util.spec_from_file_location("clip_anytorch_model", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def torch_clip(sizes, vision_heads, seed=0):
  """OpenAI's CLIP at `sizes`; its vision tower rebuilt when the heads are not OpenAI's width // 64."""
  torch.manual_seed(seed)
  module = reference_module()
  model = module.CLIP(**sizes)
  if vision_heads != sizes["vision_width"] // 64:
    model.visual = module.VisionTransformer(
        input_resolution=sizes["image_resolution"], patch_size=sizes["vision_patch_size"],
        width=sizes["vision_width"], layers=sizes["vision_layers"], heads=vision_heads,
        output_dim=sizes["embed_dim"])
  return model


def torch_optimizer(model, config):
  """AdamW with the recipe's betas/eps/decay; no decay on biases, gains and embeddings (as mmjax)."""
  decay, no_decay = [], []
  for name, param in model.named_parameters():
    (decay if param.ndim >= 2 and "embedding" not in name else no_decay).append(param)
  opt = config.optimizer
  groups = [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
  return torch.optim.AdamW(groups, lr=LEARNING_RATE, betas=(opt.b1, opt.b2), eps=opt.eps, fused=True)


def torch_train_step(model, optimizer, ema, ema_decay, max_logit_scale):
  """A step function doing what mmjax's train_step does, on OpenAI's module."""
  params = list(model.parameters())
  max_log_scale = math.log(max_logit_scale)

  def step(images, tokens):
    image_features = F.normalize(model.encode_image(images), dim=-1)
    text_features = F.normalize(model.encode_text(tokens), dim=-1)
    logits = model.logit_scale.clamp(max=max_log_scale).exp() * image_features @ text_features.t()
    labels = torch.arange(logits.shape[0])
    loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params])))
    optimizer.step()
    with torch.no_grad():
      model.logit_scale.clamp_(max=max_log_scale)
      torch._foreach_lerp_(ema, params, 1.0 - ema_decay)
    return loss.detach(), grad_norm
  return step


# ----------------------------------------------------------------------------- JAX side

def jax_config(model_fields, batch, scan_layers):
  """The clip_vit_b32 recipe around the converted model, f32, one mesh shard, no warmup."""
  model = ml_collections.ConfigDict({**model_fields, "dtype": "float32", "scan_layers": scan_layers})
  config = clip_vit_b32.clip_config(model, learning_rate=LEARNING_RATE, global_batch=batch,
                                    num_train_steps=1000)
  config.optimizer.warmup_steps = 0
  return config


def jax_train_state(config, model, params):
  params = jax.device_put(params)
  tx = state_lib.adamw(trainer.learning_rate_schedule(config), config.optimizer, mask=trainer.weight_decay_mask)
  state = state_lib.TrainState.create(apply_fn=model.apply, params=params, tx=tx, ema_decay=config.ema_decay)
  # A separate EMA buffer: the donated state may not hold one buffer twice.
  return state.replace(ema_params=jax.tree.map(jnp.copy, params))


# ----------------------------------------------------------------------------- the bench

def random_batch(sizes, batch, seed=0):
  """NHWC images and token rows <start> ids <end> 0… (the end token is the largest id)."""
  rng = np.random.default_rng(seed)
  size, context, vocab = sizes["image_resolution"], sizes["context_length"], sizes["vocab_size"]
  images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  tokens = np.zeros((batch, context), np.int64)
  for row, length in enumerate(rng.integers(3, context - 2, batch)):
    tokens[row, 0] = vocab - 2
    tokens[row, 1:length + 1] = rng.integers(1, vocab - 2, length)
    tokens[row, length + 1] = vocab - 1
  return images, tokens


def relative_error(got, expected):
  return float(np.abs(np.asarray(got) - expected).max() / np.abs(expected).max())


def resolve_scan_layers(case_default):
  return case_default if _SCAN_LAYERS.value == "config" else _SCAN_LAYERS.value == "true"


def with_torch_threads(threads, fn):
  def call():
    torch.set_num_threads(threads)
    return fn()
  return call


def bench_case(name, sizes, vision_heads, batch, case_scan_layers, calls, repeats):
  scan_layers = resolve_scan_layers(case_scan_layers)
  torch_model = torch_clip(sizes, vision_heads)
  state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  params, model_fields = convert_openai_clip.convert(state, vision_heads=vision_heads,
                                                     text_heads=sizes["transformer_heads"], scan_layers=scan_layers)
  config = jax_config(model_fields, batch, scan_layers)
  model = trainer.create_model(config)
  images, tokens = random_batch(sizes, batch)
  images_torch = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
  tokens_torch = torch.from_numpy(tokens)
  images_jax, tokens_jax = jnp.asarray(images), jnp.asarray(tokens.astype(np.int32))
  described = {
      "case": name, "image_size": sizes["image_resolution"], "patch_size": sizes["vision_patch_size"],
      "vision": f"{sizes['vision_width']} × {sizes['vision_layers']} ({vision_heads})",
      "text": f"{sizes['transformer_width']} × {sizes['transformer_layers']} ({sizes['transformer_heads']})",
      "context_length": sizes["context_length"], "vocab_size": sizes["vocab_size"], "batch": batch,
      "params": int(sum(p.numel() for p in torch_model.parameters())), "scan_layers": scan_layers,
  }
  rows = []

  def record(call, jax_fn, torch_fn, check):
    """Times JAX, PyTorch at its default threads and PyTorch on one thread, in turn (all warmed up)."""
    contenders = {"jax": jax_fn, "torch": with_torch_threads(DEFAULT_TORCH_THREADS, torch_fn),
                  "torch_1_thread": with_torch_threads(1, torch_fn)}
    contenders["torch_1_thread"]()  # its warm-up (the default-threads one was the check's call)
    times = timing.alternating(contenders, repeats, _REPEAT_SECONDS.value)
    row = {**described, "call": call, "unit": UNITS[call], **check}
    for contender, contender_times in times.items():
      row[f"{contender}_per_s"], row[f"{contender}_median_per_s"] = timing.rates(batch, contender_times)
    for contender, contender_times in times.items():
      row[f"{contender}_times_s"] = contender_times
    row["torch_best_per_s"] = max(row["torch_per_s"], row["torch_1_thread_per_s"])
    row["ratio"] = row["jax_per_s"] / row["torch_best_per_s"]
    row["ratio_default_threads"] = row["jax_per_s"] / row["torch_per_s"]
    rows.append(row)
    print(f"{name} {call}: jax {row['jax_per_s']:.4g} {UNITS[call]}/s, torch {row['torch_per_s']:.4g} "
          f"(1 thread {row['torch_1_thread_per_s']:.4g}) {UNITS[call]}/s, ratio to the faster "
          f"{row['ratio']:.2f} ({check})", flush=True)

  # Inference: the encoders alone, no gradients.
  torch_model.eval()
  encoders = {"encode_image": (clip.CLIP.encode_image, torch_model.encode_image, images_jax, images_torch),
              "encode_text": (clip.CLIP.encode_text, torch_model.encode_text, tokens_jax, tokens_torch)}
  jax_params = jax.device_put(params)
  for call in (c for c in calls if c in encoders):
    method, torch_encode, x_jax, x_torch = encoders[call]
    encode = jax.jit(functools.partial(model.apply, method=method))
    jax_fn = lambda: encode({"params": jax_params}, x_jax).block_until_ready()  # noqa: E731
    with torch.inference_mode():
      torch_fn = lambda: torch_encode(x_torch)  # noqa: E731
      error = relative_error(jax_fn(), torch_fn().numpy())  # warm-up
      record(call, jax_fn, torch_fn, {"max_rel_error": error})

  if "train_matmuls" in calls:
    # The floor under the train step: its matmuls alone, each framework's own kernels, nothing else.
    groups = [(count, kind, matmul_floor.operands(kind, dims)) for count, kind, dims in
              matmul_floor.train_products(sizes, vision_heads, batch)]
    on_jax = [(count, kind, [jnp.asarray(x) for x in ops]) for count, kind, ops in groups]
    on_torch = [(count, kind, [torch.from_numpy(x) for x in ops]) for count, kind, ops in groups]
    # Each JAX call waits for its products, as PyTorch's eager calls do.
    jax_fn = matmul_floor.caller(on_jax, lambda *a: jax.block_until_ready(matmul_floor.jax_products(*a)))
    torch_fn = matmul_floor.caller(on_torch, matmul_floor.torch_products)
    error = relative_error(jax_fn()[0], torch_fn()[0].numpy())  # warm-up: the last group's first product
    record("train_matmuls", jax_fn, torch_fn, {"max_rel_error": error})

  if "train_step" in calls:
    mesh = sharding.create_mesh(config.mesh)
    jax_step = jax.jit(functools.partial(trainer.train_step, config, mesh), donate_argnums=0)
    batch_jax = {"image": images_jax, "text_tokens": tokens_jax}
    holder = {"state": jax_train_state(config, model, params)}

    def jax_fn():
      with sharding.mesh_and_rules(mesh, config.logical_axis_rules):
        holder["state"], scalars = jax_step(holder["state"], batch_jax)
      return jax.block_until_ready(scalars)

    torch_model.train()
    ema = [p.detach().clone() for p in torch_model.parameters()]
    step = torch_train_step(torch_model, torch_optimizer(torch_model, config), ema, config.ema_decay,
                            config.model.max_logit_scale)
    torch_fn = lambda: step(images_torch, tokens_torch)  # noqa: E731
    jax_loss, torch_loss = float(jax_fn()["loss"]), float(torch_fn()[0])  # warm-up: the same first loss
    record("train_step", jax_fn, torch_fn,
           {"first_loss_jax": jax_loss, "first_loss_torch": torch_loss,
            "max_rel_error": abs(jax_loss - torch_loss) / abs(torch_loss)})
  return rows


def table(rows):
  headers = ["case", "call", "image / patch", "vision W × L (heads)", "text W × L (heads)", "batch", "params",
             "JAX /s (median)", f"PyTorch, {DEFAULT_TORCH_THREADS} threads (median)", "PyTorch, 1 thread (median)",
             "JAX / faster PyTorch"]
  return timing.markdown_table(headers, [
      [r["case"], r["call"], f"{r['image_size']} / {r['patch_size']}", r["vision"], r["text"], r["batch"],
       f"{r['params'] / 1e6:.2f}M", f"{r['jax_per_s']:.4g} ({r['jax_median_per_s']:.4g}) {r['unit']}",
       f"{r['torch_per_s']:.4g} ({r['torch_median_per_s']:.4g})",
       f"{r['torch_1_thread_per_s']:.4g} ({r['torch_1_thread_median_per_s']:.4g})", f"{r['ratio']:.2f}"]
      for r in rows])


def main(argv):
  del argv
  cases = timing.select_cases(_CASES.value, CASES)
  calls = timing.select_cases(_CALLS.value, CALLS, flag="--calls")
  load_before = timing.load_average()
  rows = []
  for name in cases:
    rows.extend(bench_case(name, *CASES[name], calls=calls, repeats=_REPEATS.value))
  timing.finish("clip.py", table(rows),
                f"f32; rates from the best of {_REPEATS.value} repeats (median in brackets) of at least "
                f"{_REPEAT_SECONDS.value:g} s of back-to-back calls, JAX and PyTorch alternating; train step = "
                f"forward, backward, AdamW, EMA (pairs/s); ratio against the faster PyTorch setting.", load_before, _OUTPUT.value, rows,
                torch_threads=DEFAULT_TORCH_THREADS, torch=torch.__version__,
                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", ""), malloc_keeps_freed_memory=HOST_MEMORY_KEPT)


if __name__ == "__main__":
  app.run(main)
