"""listening_core.resample: anti-aliasing, accuracy, streaming, delay compensation."""

from __future__ import annotations

import numpy as np
import pytest

from listening_core.resample import Resampler


def _run(r: Resampler, x: np.ndarray, chunks: list[int] | None = None) -> np.ndarray:
    parts, i = [], 0
    for size in chunks or [len(x)]:
        parts.append(r.process(x[i : i + size]))
        i += size
    parts.append(r.process(x[i:]))
    parts.append(r.flush())
    return np.concatenate(parts)


def _db(y: np.ndarray, amplitude: float) -> float:
    return float(20 * np.log10(np.sqrt(np.mean(y**2)) / (amplitude / np.sqrt(2))))


@pytest.mark.parametrize(
    ("rate_in", "rate_out"), [(48000, 16000), (48000, 44100), (48000, 8000), (48000, 24000)]
)
def test_pass_band_is_exact_and_aliases_are_suppressed(rate_in: int, rate_out: int) -> None:
    t = np.arange(rate_in) / rate_in
    low = min(rate_in, rate_out)
    tone = np.sin(2 * np.pi * 1000 * t) * 10000
    y = _run(Resampler(rate_in, rate_out), tone)
    assert len(y) == rate_out
    ref = np.sin(2 * np.pi * 1000 * np.arange(rate_out) / rate_out) * 10000
    inner = slice(rate_out // 10, -rate_out // 10)
    err = y[inner, 0] - ref[inner]
    assert 10 * np.log10(np.sum(ref[inner] ** 2) / np.sum(err**2)) > 80  # 1 kHz: > 80 dB SNR
    # a tone above the output's Nyquist frequency (and below the input's) must not alias back
    alias = np.sin(2 * np.pi * min(0.55 * rate_out, 0.98 * rate_in / 2) * t) * 10000
    if 0.55 * low < rate_in / 2:
        assert _db(_run(Resampler(rate_in, rate_out), alias)[inner], 10000) < -70


def test_streaming_equals_one_shot_and_delay_is_compensated() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(0, 3000, (48000, 2))
    whole = _run(Resampler(48000, 16000, 2), x)
    sizes = list(rng.integers(1, 1500, 60))
    assert np.array_equal(_run(Resampler(48000, 16000, 2), x, sizes), whole)
    impulse = np.zeros(48000)
    impulse[3000] = 1.0
    y = _run(Resampler(48000, 16000), impulse)
    assert int(np.argmax(y)) == 1000  # sample 3000 at 48 kHz is sample 1000 at 16 kHz
    assert _run(Resampler(48000, 16000), np.zeros(1001)).shape == (334, 1)  # ceil(1001 / 3)


def test_passthrough_and_errors() -> None:
    r = Resampler(48000, 48000, 2)
    x = np.arange(20.0).reshape(10, 2)
    assert np.array_equal(_run(r, x), x)
    with pytest.raises(ValueError):
        Resampler(0, 16000)
    r = Resampler(48000, 16000)
    r.flush()
    with pytest.raises(ValueError):
        r.process(np.zeros(3))
