"""The chaos suite's conventions (see docs/reliability.md).

Figures: every scenario reports what it measured through the ``figure`` fixture,
``figure("pod ping loss", 0, "packets")``. Each figure is

* printed at once (``[figure] name: value unit``, visible with ``pytest -s``),
* attached to the test as a junit property (``record_property``), and
* listed at the end of the run in a "chaos figures" section of the terminal summary, for passing
  and failing tests alike, so CI logs show the numbers without extra flags.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.support import Figure

_FIGURES: list[tuple[str, str, str]] = []


@pytest.fixture
def figure(request: pytest.FixtureRequest, record_property: Callable[[str, object], None]) -> Figure:
    def add(name: str, value: object, unit: str = "") -> None:
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        text += f" {unit}" if unit else ""
        _FIGURES.append((request.node.nodeid, name, text))
        record_property(name, value)
        print(f"[figure] {name}: {text}", flush=True)
    return add


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _FIGURES:
        return
    terminalreporter.section("chaos figures")
    last = ""
    for nodeid, name, text in _FIGURES:
        if nodeid != last:
            terminalreporter.write_line(nodeid)
            last = nodeid
        terminalreporter.write_line(f"    {name}: {text}")
