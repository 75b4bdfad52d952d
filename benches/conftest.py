"""Benchmarks: each module compares rollstream with the named reference
implementation in the same run and prints the ratios at the end.

Run with ``make bench-python`` (or ``pytest benches -s``). Timings are
reported, never asserted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest


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
