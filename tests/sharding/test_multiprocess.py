"""Two real processes on localhost build one global batch from their own host-local data."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from tests.sharding import multiprocess_worker as worker

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_feed_one_global_batch():
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  procs = [subprocess.Popen([sys.executable, "-m", "tests.sharding.multiprocess_worker", str(port), str(i)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outputs = []
  try:
    for proc in procs:
      out, err = proc.communicate(timeout=120)
      assert proc.returncode == 0, err[-3000:]
      outputs.append(json.loads(out.strip().splitlines()[-1]))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()

  global_rows = np.concatenate([worker.local_batch(0), worker.local_batch(1)])  # process 0's rows first
  expected_sum = float(global_rows.sum())
  expected_weighted = float((global_rows * np.arange(8)[:, None]).sum())
  for i, result in enumerate(outputs):
    assert result["process_index"] == i and result["process_count"] == 2
    assert result["device_count"] == 8
    assert result["global_shape"] == [8, worker.FEATURES]
    assert result["spec"] == "P(('data', 'fsdp'),)"
    # Both hosts see the reduction over both hosts' data, in global row order.
    assert result["sum"] == expected_sum
    assert result["weighted_sum"] == expected_weighted
    assert result["local_shard_rows"] == list(range(4 * i, 4 * i + 4))
    assert result["process_batch_size"] == 4
