"""A recording bot for Discord, built on listening-core.

Commands (prefix ``!`` or slash, once synced with ``--sync``), typed by a member who is in a voice
channel:

    !record [SINK ...] [SINK.OPTION=VALUE ...]   join your voice channel and record
                                                 (default sinks: wav mixdown)
    !pause / !resume                             stop and restart keeping audio (time runs on)
    !stop                                        finish, reply with a summary and the mixdown
    !plugins                                     the sinks installed, with their options

Each session goes to ``recordings/<started>-<guild>-<channel>/``: one folder per sink,
``session.json`` (members, timings, statistics, files; rewritten every second while recording)
and ``timeline.png`` (who spoke when). Example: ``!record wav mp3 vad-segments mp3.bitrate=96``.

Run it against Discord::

    DISCORD_TOKEN=... python examples/record_bot.py

(the bot needs the Message Content intent, enabled in the Developer Portal, and the Connect and
Send Messages permissions), or against the loopback Discord of ``listening demo``::

    python examples/record_bot.py --local loopback.json

The bot itself ships with listening-core as :mod:`listening_core.ext.recorder` (a Cog, and a
discord.py extension: ``await bot.load_extension("listening_core.ext.recorder")`` adds these
commands to your own bot); this script runs it.
"""

from __future__ import annotations

from listening_core.ext.recorder import (
    DEFAULT_SINKS,
    Recorder,
    Session,
    attachments,
    main,
    make_bot,
    parse_request,
    place_outputs,
    run,
    summary,
)

__all__ = [
    "DEFAULT_SINKS",
    "Recorder",
    "Session",
    "attachments",
    "main",
    "make_bot",
    "parse_request",
    "place_outputs",
    "summary",
]

if __name__ == "__main__":
    run()
