"""e2e collection rules: ``@pytest.mark.backends("udp", ...)`` on a test of a module whose ``lab``
fixture is parametrized by backend skips the other backends' items at collection time, so no lab
is built just to be skipped."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "backends(*names): run this lab test only for these backends")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        mark = item.get_closest_marker("backends")
        callspec = getattr(item, "callspec", None)
        if mark is None or callspec is None or "lab" not in callspec.params:
            continue
        if callspec.params["lab"] not in mark.args:
            item.add_marker(pytest.mark.skip(reason=f"only for backend(s) {', '.join(mark.args)}"))
