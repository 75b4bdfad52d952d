"""Benchmarks: each module compares rollstream with the named reference
implementation in the same run and prints the ratios at the end.

Run with ``make bench-python`` (or ``pytest benches -s -o python_files="bench_*.py"``). Timings are
reported, never asserted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from rollstream.testing import LocalVLLM, tiny_model
from rollstream.testing.pytest_plugin import require_engine


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        self.lines.append(line)


_REPORT = Report()


@pytest.fixture(scope="session")
def report() -> Report:
    return _REPORT


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _REPORT.lines:
        terminalreporter.section("rollstream benchmark ratios")
        for line in _REPORT.lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalVLLM]:
    """One real vLLM CPU server per benchmark module, room for 128 sequences."""
    require_engine()
    model = tiny_model(tmp_path_factory.mktemp("bench-model"))
    with LocalVLLM(model, max_num_seqs=128, log_path=tmp_path_factory.mktemp("log") / "vllm.log") as s:
        yield s
