"""Reliability: recipes drawn by a fuzzer (tools/fuzz_recipes.py) end as a checked run or one error
line, never a traceback; a run killed at any point and resumed equals the run never killed
(tools/fault_inject.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import fuzz_recipes  # noqa: E402


def _fuzz(count: int, seed: int) -> None:
    failures: list[str] = []
    tally = fuzz_recipes.fuzz(count, seed, log=failures.append)
    assert not failures, failures[0]
    assert sum(tally.values()) == count
    assert tally["ok"] >= count // 50 and tally["error"] >= count // 2  # both outcomes really drawn


def test_fuzzed_recipes_are_checked_runs_or_one_line_errors():
    _fuzz(1000, seed=0)


@pytest.mark.slow  # 10,000 recipes, about three minutes
def test_ten_thousand_fuzzed_recipes():
    _fuzz(10_000, seed=1)


@pytest.mark.slow  # 28 runs killed and resumed, about three minutes
def test_a_run_killed_at_every_point_resumes_to_the_run_never_killed(capsys):
    import fault_inject

    assert fault_inject.main([]) == 0
    out = capsys.readouterr().out
    killed = int(out.rsplit("fault_inject: ", 1)[1].split(" runs killed")[0])
    assert killed >= 20, out
