"""The ``faster-whisper`` engine: Whisper models run locally by CTranslate2.

Needs ``pip install 'listening-sink-transcribe[faster-whisper]'``.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from listening_core.hookspecs import Transcription

from .errors import TranscriptionError

__all__ = ["WhisperEngine", "WhisperOptions"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WhisperOptions:
    """Options of the ``faster-whisper`` engine (``engine_options`` of the ``transcribe`` sink)."""

    model: str = field(
        default="tiny.en",
        metadata={
            "help": "a model directory (CTranslate2 weights: model.bin, config.json, tokenizer.json) "
            "or a model name faster-whisper knows (tiny.en, base, small, ...; from its cache, or downloaded "
            "when download=True)"
        },
    )
    device: Literal["cpu", "cuda", "auto"] = field(default="cpu", metadata={"help": "where the model runs"})
    compute_type: str = field(
        default="int8",
        metadata={"help": "CTranslate2 compute type: int8, int8_float16, float16, float32, default"},
    )
    cpu_threads: int = field(
        default=0, metadata={"help": "threads per transcription on the CPU (0: its default)"}
    )
    beam_size: int = field(default=1, metadata={"help": "beam search width (1: greedy, the fastest)"})
    download: bool = field(
        default=False,
        metadata={"help": "allow downloading a model given by name; off: only a directory or a cached model"},
    )

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must be a model directory or a model name, got ''")
        if self.compute_type not in (
            "int8",
            "int8_float16",
            "int8_float32",
            "int8_bfloat16",
            "int16",
            "float16",
            "bfloat16",
            "float32",
            "default",
            "auto",
        ):
            raise ValueError(f"compute_type {self.compute_type!r} is not a CTranslate2 compute type")
        if self.cpu_threads < 0:
            raise ValueError(f"cpu_threads must be 0 or more, got {self.cpu_threads}")
        if not 1 <= self.beam_size <= 16:
            raise ValueError(f"beam_size must be between 1 and 16, got {self.beam_size}")
        looks_like_path = "/" in self.model or "\\" in self.model or self.model.startswith(".")
        if looks_like_path and not (Path(self.model) / "model.bin").is_file():
            raise ValueError(
                f"model {self.model!r} is not a CTranslate2 model directory (no model.bin in it); "
                "give the directory holding model.bin, config.json and tokenizer.json, or a model name"
            )


class WhisperEngine:
    """A faster-whisper model; :meth:`transcribe` is thread-safe (calls take turns: one at a time is
    fastest on a CPU)."""

    def __init__(self, options: WhisperOptions) -> None:
        try:
            from faster_whisper import WhisperModel  # type: ignore[import-untyped]
        except ImportError as exc:
            raise TranscriptionError(
                "the faster-whisper engine needs faster-whisper: "
                "pip install 'listening-sink-transcribe[faster-whisper]'"
            ) from exc
        self.options = options
        try:
            self._model = WhisperModel(
                options.model,
                device=options.device,
                compute_type=options.compute_type,
                cpu_threads=options.cpu_threads,
                local_files_only=not options.download,
            )
        except Exception as exc:
            hint = (
                "; it is not downloaded here (download=False): give a model directory, or set download=True"
                if not Path(options.model).is_dir()
                else ""
            )
            raise TranscriptionError(
                f"faster-whisper could not load model {options.model!r}: {exc}{hint}"
            ) from exc
        self._lock = threading.Lock()

    def transcribe(self, pcm: bytes, *, language: str | None, timeout: float) -> Transcription:
        """Transcribe 16 kHz mono s16le ``pcm`` (``timeout`` is not enforced: a local model cannot be stopped)."""
        import numpy as np

        audio = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
        with self._lock:
            segments, info = self._model.transcribe(
                audio,
                language=language,
                beam_size=self.options.beam_size,
                condition_on_previous_text=False,
                vad_filter=False,
            )
            found = list(segments)
        return _result(found, info)

    def close(self) -> None:
        """Drop the model (CTranslate2 frees it when the last reference goes)."""
        self._model = None


def _result(segments: list[Any], info: Any) -> Transcription:
    text = "".join(s.text for s in segments).strip()
    words = sum(max(1, len(s.tokens or ())) for s in segments)
    confidence = None
    if segments and words:
        mean = sum(s.avg_logprob * max(1, len(s.tokens or ())) for s in segments) / words
        confidence = round(math.exp(mean), 4)
    return Transcription(text, getattr(info, "language", None), confidence)
