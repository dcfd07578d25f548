"""The ``local_discord`` fixture that installing listening-core gives every pytest run.

A throwaway test project (run by ``pytester`` in a subprocess, as a user's project would be run)
asks for the fixture without any conftest: it arrives through the ``pytest11`` entry point,
started, configured by ``@pytest.mark.local_discord(...)`` and closed after each test.
"""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

USER_TESTS = '''
import asyncio
import socket

import aiohttp
import pytest

from listening_core.crypto import SUPPORTED_MODES
from listening_core.testing import FaultConfig, LocalDiscord

PORTS = {}


async def _serves(local):
    """The instance answers HTTPS on its port, through its own connector."""
    async with aiohttp.ClientSession(connector=local.connector()) as http:
        async with http.get("https://discord.com/api/v10/gateway") as resp:
            return resp.status, await resp.json()


async def test_default_options(local_discord):
    assert isinstance(local_discord, LocalDiscord)
    assert local_discord.port > 0
    assert local_discord.modes == SUPPORTED_MODES
    assert local_discord.dave_version == 1 and local_discord.dave_required
    status, body = await _serves(local_discord)
    assert status == 200 and body["url"] == "wss://gateway.discord.gg"
    PORTS["default"] = local_discord.port


@pytest.mark.local_discord(modes=("aead_aes256_gcm_rtpsize",), seed=7, faults=FaultConfig(seed=7, loss=0.25))
async def test_marker_options_reach_the_instance(local_discord):
    assert local_discord.port > 0
    assert local_discord.modes == ("aead_aes256_gcm_rtpsize",)
    assert local_discord.seed == 7
    assert local_discord.faults.loss == 0.25
    call = await local_discord.call_for(local_discord.world.voice_channel_id)
    assert call.modes == ("aead_aes256_gcm_rtpsize",)
    status, _ = await _serves(local_discord)
    assert status == 200
    PORTS["marked"] = local_discord.port


@pytest.mark.local_discord(dave=0)
async def test_another_marker(local_discord):
    assert local_discord.dave_version == 0 and not local_discord.dave_required
    assert local_discord.port not in PORTS.values()  # a fresh instance for each test
    PORTS["no-dave"] = local_discord.port


def test_every_instance_was_closed_after_its_test():
    assert sorted(PORTS) == ["default", "marked", "no-dave"]
    for name, port in PORTS.items():
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
'''

INI = "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"


def test_fixture_arrives_through_the_entry_point_configured_and_closed(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--strict-markers", "-v")
    result.assert_outcomes(passed=4)
    # the plugin is the installed distribution's, registered under its entry point name
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--trace-config", "-k", "default")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*listening_core*listening_core/testing/pytest_plugin.py*"])


def test_without_the_plugin_there_is_no_fixture(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-p", "no:listening_core", "-k", "default"
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'local_discord' not found*"])


def test_marker_is_registered_for_strict_markers(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--markers")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["@pytest.mark.local_discord(**options):*"])
