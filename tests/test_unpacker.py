"""AudioUnpacker workers never run the bot's main script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import pathlib, sys
from listening_core.pool import AudioProcessPool
from listening_core.unpacker import PLC

# No `if __name__ == "__main__":` guard, like a bot script ending in bot.run(TOKEN): with plain
# spawn, every worker would run this again.
marker = pathlib.Path(sys.argv[1])
with marker.open("a") as out:
    out.write("ran\\n")
pool = AudioProcessPool()
pool.start(1)
answers = pool.submit(pool.worker_for("user"), [("user", PLC, None, 960)]).result(timeout=60)
assert len(answers) == 1 and len(answers[0][1]) == 3840, answers
pool.shutdown()
print("decoded")
"""


def test_workers_do_not_rerun_an_unguarded_main_script(tmp_path: Path) -> None:
    script = tmp_path / "bot.py"
    script.write_text(SCRIPT, encoding="utf-8")
    marker = tmp_path / "runs.txt"
    done = subprocess.run(
        [sys.executable, str(script), str(marker)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "decoded"
    assert marker.read_text() == "ran\n"  # the script ran once: in the bot's process only
