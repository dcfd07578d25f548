"""The ``openai`` engine: any server speaking OpenAI's ``POST /v1/audio/transcriptions`` (multipart WAV).

OpenAI itself, or a server on your own machine or network that offers the same endpoint
(faster-whisper-server, whisper.cpp's server, LocalAI, vLLM...). The request runs with
:mod:`urllib` on the sink's worker thread, with ``timeout`` per request.
"""

from __future__ import annotations

import io
import json
import math
import os
import urllib.error
import urllib.parse
import urllib.request
import uuid
import wave
from dataclasses import dataclass, field
from typing import Any

from listening_core.hookspecs import Transcription

from .errors import TranscriptionError

__all__ = ["OpenAIEngine", "OpenAIOptions"]


@dataclass(frozen=True)
class OpenAIOptions:
    """Options of the ``openai`` engine (``engine_options`` of the ``transcribe`` sink)."""

    base_url: str = field(
        default="https://api.openai.com/v1",
        metadata={"help": "the API's base URL; the request goes to {base_url}/audio/transcriptions"},
    )
    model: str = field(default="whisper-1", metadata={"help": "the model name the server expects"})
    api_key_env: str = field(
        default="OPENAI_API_KEY",
        metadata={"help": "environment variable holding the API key (sent as a Bearer token when set)"},
    )
    timeout: float = field(default=30.0, metadata={"help": "seconds one request may take"})
    response_format: str = field(
        default="verbose_json",
        metadata={"help": "verbose_json (language and confidence come back) or json (text only)"},
    )

    def __post_init__(self) -> None:
        url = urllib.parse.urlsplit(self.base_url)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise ValueError(f"base_url must be an http:// or https:// URL, got {self.base_url!r}")
        if not self.model:
            raise ValueError("model must name the server's model, got ''")
        if not 0 < self.timeout <= 3600:
            raise ValueError(f"timeout must be between 0 and 3600 seconds, got {self.timeout}")
        if self.response_format not in ("verbose_json", "json"):
            raise ValueError(
                f"response_format must be 'verbose_json' or 'json', got {self.response_format!r}"
            )
        if not self.api_key_env:
            raise ValueError("api_key_env must name an environment variable, got ''")


class OpenAIEngine:
    """Posts each utterance to an OpenAI-compatible server; thread-safe (one request per call)."""

    def __init__(self, options: OpenAIOptions) -> None:
        self.options = options
        self.url = options.base_url.rstrip("/") + "/audio/transcriptions"
        key = os.environ.get(options.api_key_env)
        if key is None and urllib.parse.urlsplit(options.base_url).hostname == "api.openai.com":
            raise TranscriptionError(
                f"the openai engine needs an API key for {options.base_url}: set the environment variable "
                f"{options.api_key_env} (or api_key_env to the variable that holds it)"
            )
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}

    def transcribe(self, pcm: bytes, *, language: str | None, timeout: float) -> Transcription:
        """POST ``pcm`` (16 kHz mono s16le) as a WAV file; the request's timeout is the smaller of both."""
        fields = {"model": self.options.model, "response_format": self.options.response_format}
        if language:
            fields["language"] = language
        body, content_type = _multipart(fields, "utterance.wav", _wav(pcm))
        request = urllib.request.Request(
            self.url, data=body, method="POST", headers={**self._headers, "Content-Type": content_type}
        )
        limit = max(0.001, min(self.options.timeout, timeout))
        try:
            with urllib.request.urlopen(request, timeout=limit) as response:
                reply = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read(500).decode("utf-8", "replace").strip()
            hint = (
                " (check the API key in $" + self.options.api_key_env + ")" if exc.code in (401, 403) else ""
            )
            raise TranscriptionError(
                f"{self.url} answered {exc.code} {exc.reason}{hint}: {detail or '(no body)'}"
            ) from exc
        except TimeoutError as exc:
            raise TranscriptionError(f"{self.url} did not answer within {limit:.1f} s") from exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise TranscriptionError(f"{self.url} did not answer within {limit:.1f} s") from exc
            raise TranscriptionError(
                f"cannot reach {self.url}: {exc.reason}; is the server running and base_url right?"
            ) from exc
        except OSError as exc:
            raise TranscriptionError(f"the request to {self.url} failed: {exc}") from exc
        return _parse(self.url, reply)

    def close(self) -> None:
        """Nothing to release: each request has its own connection."""


def _wav(pcm: bytes) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16_000)
        w.writeframes(pcm)
    return out.getvalue()


def _multipart(fields: dict[str, str], filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts: list[bytes] = []
    for name, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        )
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: audio/wav\r\n\r\n".encode()
    )
    parts.append(data)
    parts.append(f"\r\n--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _parse(url: str, reply: bytes) -> Transcription:
    try:
        data: Any = json.loads(reply)
        text = data["text"]
        if not isinstance(text, str):
            raise TypeError("text is not a string")
    except (ValueError, KeyError, TypeError) as exc:
        raise TranscriptionError(
            f"{url} answered something that is not a transcription ({exc}): {reply[:200]!r}"
        ) from exc
    language = data.get("language")
    if isinstance(language, str) and len(language) > 3:  # OpenAI says "english"
        language = _ISO.get(language.lower(), language)
    segments = [s for s in data.get("segments") or () if isinstance(s, dict) and "avg_logprob" in s]
    confidence = None
    if segments:
        weights = [max(1, len(s.get("tokens") or ())) for s in segments]
        mean = sum(float(s["avg_logprob"]) * w for s, w in zip(segments, weights, strict=True)) / sum(weights)
        confidence = round(math.exp(mean), 4)
    return Transcription(text.strip(), language if isinstance(language, str) else None, confidence)


_ISO = {
    "english": "en",
    "german": "de",
    "french": "fr",
    "spanish": "es",
    "italian": "it",
    "japanese": "ja",
    "chinese": "zh",
    "portuguese": "pt",
    "dutch": "nl",
    "russian": "ru",
    "korean": "ko",
    "polish": "pl",
}
