"""bench/timing.py: repeats, alternation, rates, the markdown table and the JSON it writes (no torch)."""

import json

from absl import app
import pytest

from tests.bench import bench_script

timing = bench_script.load("timing")


def test_repeat_warms_up_once_then_times_each_call():
  calls = []
  out, times = timing.repeat(lambda: calls.append(len(calls)) or len(calls), repeats=3)
  assert calls == [0, 1, 2, 3]           # one warm-up call, then three timed ones
  assert out == 4 and len(times) == 3 and all(t >= 0 for t in times)
  _, times = timing.repeat(lambda: None, repeats=2, warmup=False)
  assert len(times) == 2
  with pytest.raises(ValueError, match="repeats=0"):
    timing.repeat(lambda: None, repeats=0)


def test_alternating_interleaves_the_contenders():
  order = []
  times = timing.alternating({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=3)
  assert order == ["a", "b"] * 3
  assert list(times) == ["a", "b"] and all(len(t) == 3 for t in times.values())


def test_rates_come_from_the_best_and_the_median_repeat():
  best, median = timing.rates(8, [0.5, 0.25, 1.0, 2.0])
  assert best == pytest.approx(32.0)           # 8 / 0.25
  assert median == pytest.approx(8 / 0.75)     # the median of four is the mean of the middle two
  assert timing.rates(3, [1.5, 0.5, 1.0]) == pytest.approx((6.0, 3.0))
  with pytest.raises(ValueError, match="no timed repeats"):
    timing.rates(1, [])


def test_markdown_table_rows_and_separator():
  text = timing.markdown_table(["case", "img/s"], [["tiny", 12.5], ["small", "3 (2.9)"]])
  assert text.splitlines() == ["| case | img/s |", "|---|---|", "| tiny | 12.5 |", "| small | 3 (2.9) |"]
  with pytest.raises(ValueError, match="row 1 has 1 cells, expected 2"):
    timing.markdown_table(["case", "img/s"], [["tiny", 1], ["small"]])


def test_select_cases_keeps_order_and_names_the_flag():
  assert timing.select_cases(["b", "a"], {"a": 1, "b": 2}) == ["b", "a"]
  with pytest.raises(app.UsageError, match=r"--calls: unknown \['c'\]"):
    timing.select_cases(["a", "c"], ("a", "b"), flag="--calls")


def test_environment_and_results_file(tmp_path, capsys):
  environment = timing.environment((1.0, 2.0, 3.0), torch_threads=2)
  assert environment["load_average_before"] == [1.0, 2.0, 3.0] and environment["torch_threads"] == 2
  assert len(environment["load_average_after"]) == 3 and environment["cpu"]
  path = tmp_path / "results" / "x.json"
  timing.write_results(path, "cmd", environment, [{"case": "tiny", "ratio": 1.5}])
  assert json.loads(path.read_text()) == {"command": "cmd", "environment": environment,
                                          "rows": [{"case": "tiny", "ratio": 1.5}]}
  assert f"wrote {path}" in capsys.readouterr().out


def test_finish_prints_table_summary_load_and_command_then_writes(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr("sys.argv", ["x.py", "--cases=tiny"])
  path = tmp_path / "x.json"
  timing.finish("x.py", "| t |", "f32, best of 3.", (1.5, 0.0, 0.0), path, [{"case": "tiny"}], torch_threads=1)
  out = capsys.readouterr().out
  assert "| t |\n\nf32, best of 3. Load average before/after 1.5/" in out
  assert "Reproduce: `.venv/bin/python bench/x.py --cases=tiny`" in out
  written = json.loads(path.read_text())
  assert written["command"] == ".venv/bin/python bench/x.py --cases=tiny" and written["rows"] == [{"case": "tiny"}]
  assert written["environment"]["torch_threads"] == 1


def test_short_calls_are_repeated_back_to_back_to_fill_each_repeat(monkeypatch):
  clock, calls = [0.0], []
  monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])

  def contender(name, seconds):
    def call():
      calls.append(name)
      clock[0] += seconds
    return call

  times = timing.alternating({"a": contender("a", 0.3), "b": contender("b", 0.1)}, repeats=2, repeat_seconds=1.0)
  # One untimed call of the first contender sets the count, ceil(1.0 / 0.3) = 4, for both.
  assert calls == ["a"] + (["a"] * 4 + ["b"] * 4) * 2
  assert times["a"] == pytest.approx([0.3, 0.3]) and times["b"] == pytest.approx([0.1, 0.1])  # per call
  calls.clear()
  timing.alternating({"a": contender("a", 2.5)}, repeats=1, repeat_seconds=1.0)
  assert calls == ["a", "a"]    # a call longer than the repeat runs once per repeat
