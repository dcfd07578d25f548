"""The exception hierarchy as a bot sees it: misuse of the API is a discord.ClientException."""

from __future__ import annotations

import pickle
import subprocess
import sys

import discord
import pytest

from listening_core import ListeningError, ListeningStateError
from listening_core.voice_client import VoiceClient


class _Disconnected:
    def is_connected(self) -> bool:
        return False


class _Connected:
    def is_connected(self) -> bool:
        return True

    def _current(self) -> None:
        return None


def test_wrong_state_is_caught_as_discord_client_exception() -> None:
    # a bot's own handler for discord.py's voice errors also catches listening-core's
    with pytest.raises(discord.ClientException, match="connect to a voice channel before listening"):
        VoiceClient.listen(_Disconnected(), "wav")  # type: ignore[arg-type]
    try:
        VoiceClient.pause_listening(_Connected())  # type: ignore[arg-type]
    except discord.ClientException as exc:
        caught = exc
    assert isinstance(caught, ListeningStateError)
    # the earlier bases still catch it
    assert isinstance(caught, ListeningError) and isinstance(caught, RuntimeError)
    assert "not listening" in str(pickle.loads(pickle.dumps(caught)))
    assert type(pickle.loads(pickle.dumps(caught))) is ListeningStateError


def test_decoding_workers_do_not_import_discord() -> None:
    # ListeningStateError is made on first use: the modules a worker imports stay free of discord.py
    code = (
        "import sys, listening_core.errors, listening_core.unpacker, listening_core.opus; "
        "print('discord' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
