"""mmjax.host_memory: after keep_freed_memory(), freeing and reallocating a large buffer reuses its
pages instead of faulting fresh ones in (the per-step cost it removes from XLA:CPU runs)."""

import os
import subprocess
import sys

import pytest

# Mallocs, fills and frees a 64 MB buffer five times on a worker thread (as XLA:CPU's scratch); prints
# whether the settings applied and the minor page faults of the last four rounds.
_PROGRAM = r"""
import ctypes, resource, sys, threading
from mmjax import host_memory
applied = host_memory.keep_freed_memory() if sys.argv[1] == "apply" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size, faults = 64 << 20, []
def rounds():
  for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = libc.malloc(size)
    ctypes.memset(buffer, 1, size)   # every page written, as a step's scratch is
    libc.free(buffer)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
worker = threading.Thread(target=rounds)
worker.start()
worker.join()
print(applied, sum(faults[1:]))
"""


def _run(mode, **env):
  environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
  environment.update({"JAX_PLATFORMS": "cpu", **env})
  out = subprocess.run([sys.executable, "-c", _PROGRAM, mode], env=environment, check=True,
                       capture_output=True, text=True).stdout.split()
  return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
  applied, faults = _run("apply")
  untouched, faults_without = _run("skip")
  assert applied and not untouched
  pages = (64 << 20) // 4096
  assert faults_without > 3 * pages      # each round maps and faults in fresh pages
  assert faults < pages // 4             # the rounds after the first reuse the pages


def test_users_own_malloc_settings_and_accelerators_are_left_alone():
  assert _run("apply", MALLOC_ARENA_MAX="4")[0] is False
  assert _run("apply", JAX_PLATFORMS="tpu")[0] is False
