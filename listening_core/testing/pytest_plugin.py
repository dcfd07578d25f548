"""pytest plugin (entry point ``pytest11``): the ``local_discord`` fixture.

``local_discord`` is a started :class:`~listening_core.testing.LocalDiscord`, closed after the
test. Configure it per test with the marker::

    @pytest.mark.local_discord(modes=("aead_aes256_gcm_rtpsize",), faults=FaultConfig(loss=0.05))
    async def test_something(local_discord): ...

The fixture is async: it needs pytest-asyncio (``asyncio_mode = "auto"`` or ``@pytest.mark.asyncio``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - exercised only without pytest-asyncio
    pytest_asyncio = None  # type: ignore[assignment]


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``local_discord`` marker (pytest hook)."""
    config.addinivalue_line(
        "markers", "local_discord(**options): options for the local_discord fixture (LocalDiscord's keywords)"
    )


if pytest_asyncio is not None:

    @pytest_asyncio.fixture
    async def local_discord(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
        """A started loopback Discord; options come from ``@pytest.mark.local_discord(...)``."""
        from .server import LocalDiscord

        marker = request.node.get_closest_marker("local_discord")
        options = dict(marker.kwargs) if marker is not None else {}
        async with LocalDiscord(**options) as discord_:
            yield discord_

else:  # pragma: no cover

    @pytest.fixture
    def local_discord() -> Any:
        """Needs pytest-asyncio."""
        pytest.fail("the local_discord fixture is async: pip install pytest-asyncio", pytrace=False)
