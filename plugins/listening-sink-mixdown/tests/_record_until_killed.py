"""Child of the crash-safety test: records one member into the mixdown sink until it SIGKILLs itself.

Prints ``ready``, then ``frame <monotonic time> <user id> <ssrc> <sequence> <position> <pcm base64>``
for every frame once the sink has handled it (so the parent knows what was delivered when), and
``kill <monotonic time>`` just before it kills itself, ``argv[2]`` seconds into the clip.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import sys
import time

from listening_sink_mixdown import MixdownOptions, MixdownSink

from listening_core.testing import LocalDiscord, Schedule, join_voice


class ReportingSink(MixdownSink):
    def on_valid_audio(self, frame):  # type: ignore[no-untyped-def]
        super().on_valid_audio(frame)
        pcm = base64.b64encode(frame.pcm).decode()
        print(
            f"frame {time.monotonic():.6f} {frame.user_id} {frame.ssrc} {frame.sequence} {frame.position} {pcm}",
            flush=True,
        )


async def main(directory: str, kill_after: float) -> None:
    async with LocalDiscord() as local:
        alice = local.add_member("alice")
        await alice.join()
        _client, vc = await join_voice(local)
        await asyncio.sleep(0.3)
        vc.listen(ReportingSink(MixdownOptions(directory=directory)))
        print("ready", flush=True)
        alice.speak(Schedule.from_clips([("three-phrases", 0.0)]))
        await asyncio.sleep(kill_after)
        print(f"kill {time.monotonic():.6f}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2])))
