"""What every bench shares: timed repeats (alternating between contenders), rates from the best and
median repeat, the machine's description with its load average, a markdown table, the JSON results.

Best-of-N is the headline because noise from other processes only ever adds time; the median is
reported next to it so a noisy run shows. Contenders compared against each other run their repeats
in turn (A, B, A, B, …) so both see the same background load.
"""

import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time

from absl import app


def timed(fn):
  """Seconds one call of `fn()` takes (wall clock)."""
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def repeat(fn, repeats, warmup=True):
  """(last output, [seconds] of `repeats` timed calls), after one untimed warm-up call (compilation)."""
  if repeats < 1:
    raise ValueError(f"repeat: repeats={repeats}, expected at least 1")
  out = fn() if warmup else None
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - start)
  return out, times


def alternating(fns, repeats, repeat_seconds=0.0):
  """{name: [seconds per call]} for `fns` ({name: callable}, already warmed up), timed in turn each round.

  Each repeat calls one contender back to back, as many times as fill `repeat_seconds` for the first
  contender (at least once): a single short call mostly times thread pools waking up and whatever
  the previous contender left running. Every contender gets the same count.
  """
  if repeats < 1:
    raise ValueError(f"alternating: repeats={repeats}, expected at least 1")
  calls = max(1, math.ceil(repeat_seconds / timed(next(iter(fns.values()))))) if repeat_seconds > 0 else 1
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      times[name].append(timed(lambda fn=fn: [fn() for _ in range(calls)]) / calls)
  return times


def rates(count, times):
  """(count / best seconds, count / median seconds): items per second from the fastest and the median repeat."""
  if not times:
    raise ValueError("rates: no timed repeats")
  return count / min(times), count / statistics.median(times)


def cpu_name():
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def load_average():
  """The 1, 5 and 15 minute load averages (zeros where the OS has none)."""
  try:
    return os.getloadavg()
  except OSError:
    return (0.0, 0.0, 0.0)


def environment(load_before, **extra):
  """The machine and library versions, `extra` fields (e.g. torch threads), and the load average
  before (`load_before`, taken when the bench started) and now."""
  import jax  # pylint: disable=g-import-not-at-top  (only benches that already use JAX call this)
  return {
      "cpu": cpu_name(), "cpu_count": os.cpu_count(), **extra, "jax": jax.__version__,
      "jax_devices": [str(d) for d in jax.devices()], "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "load_average_before": list(load_before), "load_average_after": list(load_average()),
  }


def select_cases(requested, known, flag="--cases"):
  """`requested` names in order; app.UsageError naming the flag when one is not in `known`."""
  unknown = sorted(set(requested) - set(known))
  if unknown:
    raise app.UsageError(f"{flag}: unknown {unknown}, expected some of {list(known)}")
  return list(requested)


def markdown_table(headers, rows):
  """A markdown table: `headers` [str] and `rows` [[cell]] (cells str()-ed; every row as long as headers)."""
  for index, row in enumerate(rows):
    if len(row) != len(headers):
      raise ValueError(f"markdown_table: row {index} has {len(row)} cells, expected {len(headers)}")
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  lines.extend("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)
  return "\n".join(lines)


def command_line(script):
  """How to rerun this bench from the repository root, with the flags it was given."""
  return " ".join([".venv/bin/python", f"bench/{script}"] + sys.argv[1:])


def write_results(path, command, environment_fields, rows):
  """Writes {"command", "environment", "rows"} as JSON to `path` (folders created) and says so."""
  output = pathlib.Path(path)
  output.parent.mkdir(parents=True, exist_ok=True)
  output.write_text(json.dumps({"command": command, "environment": environment_fields, "rows": rows}, indent=1))
  print(f"wrote {output}")


def finish(script, table_text, summary, load_before, output, rows, **extra):
  """Ends a bench: prints the table, `summary` with the load average before/after and the command
  that reproduces the run, and writes the JSON results (`environment` fields plus `extra`)."""
  command = command_line(script)
  fields = environment(load_before, **extra)
  print()
  print(table_text)
  print(f"\n{summary} Load average before/after {load_before[0]:.1f}/{fields['load_average_after'][0]:.1f} "
        f"on {os.cpu_count()} cores.\nReproduce: `{command}`")
  write_results(output, command, fields, rows)
