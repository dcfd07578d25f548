"""Every code block in the README is executed.

- ``python`` blocks run as scripts. The recording-bot quickstart (the block that calls
  ``bot.run(os.environ["DISCORD_TOKEN"])``) runs against a loopback Discord: a ``sitecustomize``
  hands discord.py the loopback's connector, and a member types ``!record``, speaks and types
  ``!stop``, as a person would on Discord.
- ``sh`` blocks run line by line: ``listening ...`` for real; ``pip install`` of this checkout
  with ``--dry-run`` (installing would replace the environment running the tests); ``make demo``
  and ``make test`` are what ``.ci/run`` executes on a fresh machine, which this test checks.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys

import pytest
import soundfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TEXT = README.read_text(encoding="utf-8")
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", TEXT, re.S)
PYTHON = [code for lang, code in BLOCKS if lang == "python" and "DISCORD_TOKEN" not in code]
BOTS = [code for lang, code in BLOCKS if lang == "python" and "DISCORD_TOKEN" in code]
SHELL = [code for lang, code in BLOCKS if lang == "sh"]


def shell_lines(code: str) -> list[str]:
    joined = code.replace("\\\n", " ")
    lines = []
    for line in joined.splitlines():
        line = line.split("  #", 1)[0].split(" # ", 1)[0].strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def test_every_block_is_one_this_test_runs() -> None:
    assert {lang for lang, _ in BLOCKS} <= {"python", "sh"}, "a block in a language no test runs"
    assert PYTHON and BOTS and SHELL


@pytest.mark.parametrize("index", range(len(PYTHON)))
def test_python_block_runs(index: int, tmp_path: pathlib.Path) -> None:
    script = tmp_path / f"readme_{index}.py"
    script.write_text(PYTHON[index], encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("line", [line for code in SHELL for line in shell_lines(code)])
def test_shell_line_runs(line: str, tmp_path: pathlib.Path) -> None:
    words = shlex.split(line)
    if words[0] == "make":
        ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
        assert line in ci, f"{line!r} is not run by .ci/run"
        return
    if words[:2] == ["pip", "install"]:
        args = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--no-deps",
            "--no-build-isolation",
            *words[2:],
        ]
        done = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-3000:]
        would = done.stdout.split("Would install", 1)[-1]
        for path in words[2:]:
            name = "listening-core" if path.startswith(".") else pathlib.Path(path).name
            assert name.replace("-", "_") in would.replace("-", "_"), (name, done.stdout[-2000:])
        return
    assert words[0] == "listening", f"no rule to run {line!r}"
    done = subprocess.run(
        [sys.executable, "-m", "listening_core", *words[1:]], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


SITECUSTOMIZE = """
import os

import discord.http
from discord.utils import MISSING

from listening_core.testing import LoopbackAddress

_address = LoopbackAddress.load(os.environ["README_LOOPBACK"])
_static_login = discord.http.HTTPClient.static_login


async def static_login(self, token):
    if self.connector is MISSING:  # the loopback instead of discord.com
        self.connector = _address.connector()
    return await _static_login(self, token)


discord.http.HTTPClient.static_login = static_login
"""


@pytest.mark.timeout(180)
@pytest.mark.parametrize("index", range(len(BOTS)))
async def test_bot_block_records_through_the_loopback(index: int, tmp_path: pathlib.Path) -> None:
    from listening_core.testing import LocalDiscord, Schedule

    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    script = tmp_path / "bot.py"
    script.write_text(BOTS[index], encoding="utf-8")
    async with LocalDiscord() as local:
        account = local.add_bot("quickstart")
        address = local.address(account).save(tmp_path / "loopback.json")
        env = dict(
            os.environ,
            DISCORD_TOKEN=account.token,
            README_LOOPBACK=str(address),
            PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            cwd=tmp_path,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            loop = asyncio.get_running_loop()

            async def until(check: object, what: str, timeout: float = 60.0) -> None:
                deadline = loop.time() + timeout
                while not check():  # type: ignore[operator]
                    assert proc.returncode is None, f"the bot exited while waiting for {what}"
                    assert loop.time() < deadline, f"timed out waiting for {what}"
                    await asyncio.sleep(0.05)

            def replied(text: str) -> bool:
                return any(m.author.id == account.user.id and text in m.content for m in local.messages())

            await until(lambda: local.gateway.connection_of(account.user.id) is not None, "the bot to log in")
            await asyncio.sleep(2.5)  # discord.py waits for its guilds before dispatching commands
            erin = local.add_member("erin")
            await erin.join()
            await local.post_message(erin.user, "!record")
            await until(lambda: replied("Recording"), "the bot to start recording")
            await asyncio.sleep(1.0)
            await erin.speak(Schedule.from_clips([("alice", 0.0)]))
            await local.post_message(erin.user, "!stop")
            await until(lambda: replied("Saved in recordings/"), "the bot to stop")
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGINT)
                try:
                    await asyncio.wait_for(proc.wait(), 20)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
        output = (await proc.stdout.read()).decode(errors="replace") if proc.stdout else ""
    audio, rate = soundfile.read(tmp_path / "recordings" / "erin.wav", dtype="int16")
    assert rate == 48_000 and len(audio) >= 2.9 * rate and abs(audio).max() > 1000, output[-3000:]
    (mixdown,) = (tmp_path / "recordings").glob("mixdown-*.wav")
    assert soundfile.info(str(mixdown)).frames >= 2.9 * rate
    assert "Traceback" not in output, output[-3000:]
