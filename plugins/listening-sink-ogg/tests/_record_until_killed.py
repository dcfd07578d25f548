"""Child process of the crash-safety test: records one member into ogg-opus until SIGKILLed.

Prints ``frame <monotonic time> <position> <opus hex>`` for every frame the sink has handed to
its writer (so the parent knows what was delivered when), after a ``ready`` line.
"""

from __future__ import annotations

import asyncio
import sys
import time

from listening_sink_ogg import OggOpusOptions, OggOpusSink

from listening_core.testing import LocalDiscord, Schedule, join_voice


class ReportingSink(OggOpusSink):
    def on_valid_audio(self, frame):  # type: ignore[no-untyped-def]
        super().on_valid_audio(frame)
        if frame.opus:
            print(f"frame {time.monotonic():.6f} {frame.position} {frame.opus.hex()}", flush=True)


async def main(directory: str) -> None:
    async with LocalDiscord() as local:
        alice = local.add_member("alice")
        await alice.join()
        _client, vc = await join_voice(local)
        vc.listen(ReportingSink(OggOpusOptions(directory=directory, flush_interval=0.5)))
        print("ready", flush=True)
        while True:  # speak until killed
            await alice.speak(Schedule.from_clips([("three-phrases", 0.0)]))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
