"""``AudioUnpacker``: a worker process that turns ordered Opus into PCM.

The receiver (in the bot's process) opens, attributes, DAVE-decrypts and orders every packet, and
decides for each lost frame whether it is rebuilt from FEC or concealed; it then sends each
worker batches of decode jobs. A worker keeps one Opus decoder per stream (a speaker's SSRC in
one session): the receiver pins each stream to one worker, so a decoder always sees its frames in
order. Jobs and answers cross the pipe as plain tuples of ints and bytes (and, for a batch the
worker could not decode at all, the worker's own exception); nothing that came from the network
is ever unpickled.

This module is imported by the worker processes: it stays light (no discord.py import).
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import multiprocessing.context
import os
import pickle
import signal
import threading
from collections.abc import Hashable
from typing import Any

_log = logging.getLogger(__name__)

# Serialises AudioUnpacker starts while they swap multiprocessing.spawn.get_preparation_data.
_SPAWN_LOCK = threading.Lock()

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

    The worker does not import the bot's main script (``spawn`` normally re-runs it as
    ``__mp_main__``): a bot written as a plain script that ends in ``bot.run(TOKEN)`` without an
    ``if __name__ == "__main__":`` guard would otherwise log in a second time from every worker.
    Only this module and what it imports run in the worker.

    A batch it cannot decode at all (libopus cannot be loaded here:
    :class:`~listening_core.opus.LibopusNotFound`, whose message names the fix; or a bug) is
    answered ``(batch_id, exception)``, and the worker goes on: the pool fails that batch's future
    with the exception. Anything else that goes wrong is logged with its traceback before the
    worker exits with status 1.
    """

    def __init__(self, conn: multiprocessing.connection.Connection, index: int) -> None:
        super().__init__(name=f"listening-core-unpacker-{index}", daemon=True)
        self._conn = conn
        self.index = index

    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        """Start the process with ``spawn``, leaving the main module out of what the child prepares."""
        from multiprocessing import spawn

        with _SPAWN_LOCK:
            original = spawn.get_preparation_data

            def without_main(name: str) -> dict[str, Any]:
                data: dict[str, Any] = original(name)
                data.pop("init_main_from_path", None)
                data.pop("init_main_from_name", None)
                return data

            spawn.get_preparation_data = without_main
            try:
                return multiprocessing.context.SpawnProcess._Popen(process_obj)
            finally:
                spawn.get_preparation_data = original

    def run(self) -> None:
        """The worker's loop: answer batches until ``None`` arrives or the pipe closes."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the bot handles Ctrl-C; the pool stops us
        conn = self._conn
        decoders: dict[Any, Any] = {}
        status = 0
        try:
            while True:
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    break
                if message is None:
                    break
                batch_id, jobs = message
                try:
                    answer: list[DecodeAnswer] | BaseException = decode_batch(decoders, jobs)
                except Exception as exc:  # e.g. LibopusNotFound: the pool hands it to the receiver
                    answer = _portable(exc)
                conn.send((batch_id, answer))
        except (BrokenPipeError, EOFError, OSError):
            pass
        except BaseException:
            _log.critical("decoding worker %d failed", self.index, exc_info=True)
            status = 1
        finally:
            for decoder in decoders.values():
                decoder.close()
            conn.close()
            os._exit(status)  # skip interpreter teardown: nothing else to flush here


def _portable(exc: Exception) -> Exception:
    """``exc`` if it survives pickling (to cross the pipe), else a :class:`ListeningError` with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        from .errors import ListeningError

        return ListeningError(f"{type(exc).__name__}: {exc}")
    return exc
