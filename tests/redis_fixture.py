"""A real Redis for tests: one embedded ``redis-server`` per test session, stopped at the end.

Import the fixture into a test module (``from tests.redis_fixture import redis_server``), or register this
module once in the root conftest with ``pytest_plugins = ["tests.redis_fixture"]``.
"""
from __future__ import annotations

from typing import Iterator

import pytest

from workers.redis_server import EmbeddedRedis


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(maxmemory="256mb") as server:
        yield server
