"""The unit tests' shared fixtures: a handler on the shipped configuration (its lead made
LEAD) and an empty in-memory case book."""

from __future__ import annotations

import pytest

from mailrouter.core.handle import Handler
from mailrouter.testing.book import MemoryCaseBook
from tests.unit.test_handle import handler_with


@pytest.fixture
def handler() -> Handler:
    return handler_with()


@pytest.fixture
def book() -> MemoryCaseBook:
    return MemoryCaseBook()
