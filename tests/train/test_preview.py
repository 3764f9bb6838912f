"""The preview job (what `make demo` runs) end to end on a tiny shapes set, in one and in two processes."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--config=mmjax/configs/shapes_preview.py", "--config.data.num_examples=256",
        "--config.data.image_size=32", "--config.data.global_batch=16", "--config.data.text_length=24",
        "--config.tokenizer.corpus=dataset", "--config.tokenizer.vocab_size=128"]


def _main(workdir, *args, devices=8):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.Popen([sys.executable, "-m", "mmjax.main", f"--workdir={workdir}", *TINY, *args],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process, timeout=240):
  output, _ = process.communicate(timeout=timeout)
  assert process.returncode == 0, output[-3000:]
  return output


def _check_outputs(workdir, batch):
  grid = np.asarray(Image.open(workdir / "preview.png"))
  assert grid.shape[0] > 128 and grid.shape[1] > 128 and grid.std() > 10
  rows = json.loads((workdir / "preview.json").read_text())
  assert len(rows) == batch
  for row in rows:
    # The tokenizer lower-cases; decoding the ids gives the caption back.
    assert row["decoded"] == row["caption"].lower(), row
    assert len(row["text_tokens"]) == 24


def test_preview_single_process(tmp_path):
  output = _finish(_main(tmp_path))
  assert "sharding P(('data', 'fsdp'),)" in output
  _check_outputs(tmp_path, batch=16)


def test_preview_two_processes(tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  workers = [_main(tmp_path, "--distributed=on", f"--coordinator_address=127.0.0.1:{port}",
                   "--num_processes=2", f"--process_id={i}", devices=4) for i in range(2)]
  outputs = [_finish(w) for w in workers]
  assert "devices=8 processes=2" in outputs[0]
  # Each host fed 8 of the 16 rows; process 0 writes its own half of the batch.
  _check_outputs(tmp_path, batch=8)
