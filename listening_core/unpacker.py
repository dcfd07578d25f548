"""``AudioUnpacker``: a worker process that turns ordered Opus into PCM.

The receiver (in the bot's process) opens, attributes, DAVE-decrypts and orders every packet, and
decides for each lost frame whether it is rebuilt from FEC or concealed; it then sends each
worker batches of decode jobs. A worker keeps one Opus decoder per stream (a speaker's SSRC in
one session): the receiver pins each stream to one worker, so a decoder always sees its frames in
order. Jobs and answers cross the pipe as plain tuples of ints and bytes; nothing that came from
the network is ever unpickled.

This module is imported by the worker processes: it stays light (no discord.py import).
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import multiprocessing.context
import os
import signal
from collections.abc import Hashable
from typing import Any

_log = logging.getLogger(__name__)

__all__ = ["CLOSE", "CONCEALED", "DECODE", "FAILED", "FEC", "OK", "PLC", "AudioUnpacker", "DecodeJob"]

# Job operations.
DECODE, FEC, PLC, CLOSE = 0, 1, 2, 3
# Answer statuses.
OK, CONCEALED, FAILED = 0, 1, 2

#: One job: (stream key, operation, Opus payload or None, samples per channel).
DecodeJob = tuple[Hashable, int, "bytes | None", int]
#: One answer: (status, PCM or None). CONCEALED: the packet was corrupt and PLC replaced it.
DecodeAnswer = tuple[int, "bytes | None"]


def decode_batch(decoders: dict[Any, Any], jobs: list[DecodeJob]) -> list[DecodeAnswer]:
    """Run one batch of jobs against ``decoders`` (made on first use). Pure apart from the decoders."""
    from .opus import OpusDecoder, OpusError

    answers: list[DecodeAnswer] = []
    for key, op, payload, samples in jobs:
        if op == CLOSE:
            decoder = decoders.pop(key, None)
            if decoder is not None:
                decoder.close()
            answers.append((OK, None))
            continue
        decoder = decoders.get(key)
        if decoder is None:
            decoder = decoders[key] = OpusDecoder()
        try:
            if op == DECODE:
                assert payload is not None
                answers.append((OK, decoder.decode(payload)))
            elif op == FEC:
                assert payload is not None
                answers.append((OK, decoder.decode_fec(payload, samples)))
            else:
                answers.append((OK, decoder.conceal(samples)))
        except OpusError:
            # A corrupt frame costs that frame, not the stream: conceal it and say so.
            try:
                answers.append((CONCEALED, decoder.conceal(samples)))
            except OpusError:
                answers.append((FAILED, None))
    return answers


class AudioUnpacker(multiprocessing.context.SpawnProcess):
    """One decoding worker of an :class:`~listening_core.pool.AudioProcessPool`.

    Always started with ``spawn``: a bot's process has threads (the event loop, discord.py's
    socket reader) that ``fork`` would copy in an unsafe state. Receives ``(batch_id, jobs)`` on
    its pipe and answers ``(batch_id, answers)`` in the same order; ``None`` asks it to stop. It
    ends by itself when the pipe closes (its pool is gone).
    """

    def __init__(self, conn: multiprocessing.connection.Connection, index: int) -> None:
        super().__init__(name=f"listening-core-unpacker-{index}", daemon=True)
        self._conn = conn
        self.index = index

    def run(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the bot handles Ctrl-C; the pool stops us
        conn = self._conn
        decoders: dict[Any, Any] = {}
        try:
            while True:
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    break
                if message is None:
                    break
                batch_id, jobs = message
                conn.send((batch_id, decode_batch(decoders, jobs)))
        except (BrokenPipeError, EOFError, OSError):
            pass
        finally:
            for decoder in decoders.values():
                decoder.close()
            conn.close()
            os._exit(0)  # skip interpreter teardown: nothing else to flush here
