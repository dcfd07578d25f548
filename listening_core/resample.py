"""A streaming, anti-aliased sample-rate converter in numpy (48 kHz → 16 kHz and friends).

:class:`Resampler` converts between any two integer rates by the rational factor ``L/M``
(``out/in`` reduced): a polyphase FIR, the Kaiser-windowed sinc low-pass designed here for

- a pass band up to ``0.45 * min(in, out)`` (7.2 kHz for 48 → 16 kHz),
- a stop band from ``0.5 * min(in, out)`` (the lower Nyquist frequency: nothing aliases),
- 80 dB of stop-band attenuation.

It is streaming: :meth:`Resampler.process` takes any number of samples and returns the output
samples that are complete, keeping only the filter's history (a few hundred samples) between
calls, so memory does not grow with the stream, and the result does not depend on how the
input was cut. The filter's delay is compensated: output sample ``n`` is the signal at time
``n / out_rate``, exactly where input sample ``n * in/out`` was, so resampled tracks stay
aligned with the session timeline. :meth:`Resampler.flush` ends the stream and returns the
tail, for ``ceil(total_in * out / in)`` output samples in all.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

__all__ = ["Resampler", "design_lowpass"]

_ATTENUATION_DB = 80.0
_PASS = 0.45
_STOP = 0.5


def design_lowpass(in_rate: int, out_rate: int) -> tuple[npt.NDArray[np.float64], int, int, int]:
    """The prototype filter for ``in_rate → out_rate``: ``(h, L, M, half)``.

    ``h`` has ``2 * half * L + 1`` taps at the up-sampled rate ``in_rate * L`` (so its delay,
    ``half * L``, is a whole number of input samples) and a gain of ``L``.
    """
    g = math.gcd(in_rate, out_rate)
    up, down = out_rate // g, in_rate // g
    fs_up = in_rate * up
    low = min(in_rate, out_rate)
    cutoff = (_PASS + _STOP) / 2 * low  # Hz, the middle of the transition band
    width = 2 * math.pi * (_STOP - _PASS) * low / fs_up  # transition width, rad/sample
    taps = math.ceil((_ATTENUATION_DB - 8.0) / (2.285 * width)) + 1
    half = max(2, math.ceil(taps / (2 * up)))
    length = 2 * half * up + 1
    beta = 0.1102 * (_ATTENUATION_DB - 8.7)
    k = np.arange(length, dtype=np.float64) - half * up
    h = 2 * cutoff / fs_up * np.sinc(2 * cutoff / fs_up * k) * np.kaiser(length, beta)
    h *= up / h.sum()
    return h, up, down, half


class Resampler:
    """Streaming ``in_rate → out_rate`` conversion of ``channels``-channel audio (see the module)."""

    def __init__(self, in_rate: int, out_rate: int, channels: int = 1) -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {in_rate} → {out_rate}")
        if channels <= 0:
            raise ValueError(f"channels must be positive, got {channels}")
        self.in_rate = in_rate
        self.out_rate = out_rate
        self.channels = channels
        h, self.up, self.down, half = design_lowpass(in_rate, out_rate)
        self.taps = 2 * half + 1  # taps per phase
        phases = np.zeros((self.up, self.taps), dtype=np.float64)
        for p in range(self.up):
            column = h[p :: self.up]
            phases[p, : len(column)] = column
        self._phases_rev = np.ascontiguousarray(phases[:, ::-1])
        self._delay = half * self.up  # in up-sampled samples
        self._buf = np.zeros((self.taps - 1, channels), dtype=np.float64)
        self._buf_start = -(self.taps - 1)  # input index of _buf[0]; zeros before the stream
        self.samples_in = 0
        self.samples_out = 0
        self._flushed = False

    @property
    def passthrough(self) -> bool:
        """Whether the two rates are equal: samples then pass through unchanged (no filter, no delay)."""
        return self.in_rate == self.out_rate

    def output_length(self, samples_in: int) -> int:
        """Output samples for ``samples_in`` input samples, once flushed."""
        return -(-samples_in * self.up // self.down)

    def process(self, data: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Feed ``data`` (shape ``(n, channels)`` or ``(n,)`` for one channel); returns ``(m, channels)``."""
        if self._flushed:
            raise ValueError("the resampler was flushed; make a new one for a new stream")
        x = np.asarray(data, dtype=np.float64)
        if x.ndim == 1:
            x = x.reshape(-1, 1)
        if x.shape[1] != self.channels:
            raise ValueError(f"expected {self.channels} channel(s), got {x.shape[1]}")
        if self.passthrough:
            self.samples_in += len(x)
            self.samples_out += len(x)
            return x.copy()
        self._buf = np.concatenate([self._buf, x]) if len(self._buf) else x.copy()
        self.samples_in += len(x)
        return self._run(self._buf_start + len(self._buf) - 1, limit=None)

    def flush(self) -> npt.NDArray[np.float64]:
        """End the stream: the remaining output, up to :meth:`output_length` of all input."""
        if self._flushed:
            return np.zeros((0, self.channels))
        self._flushed = True
        if self.passthrough:
            return np.zeros((0, self.channels))
        pad = np.zeros((self.taps, self.channels))
        self._buf = np.concatenate([self._buf, pad])
        return self._run(self._buf_start + len(self._buf) - 1, limit=self.output_length(self.samples_in))

    def _run(self, last_index: int, limit: int | None) -> npt.NDArray[np.float64]:
        # outputs n with (n*M + D) // L <= last_index
        top = ((last_index + 1) * self.up - self._delay - 1) // self.down + 1  # one past the last n
        if limit is not None:
            top = min(top, limit)
        start = self.samples_out
        if top <= start:
            return np.zeros((0, self.channels))
        n = np.arange(start, top, dtype=np.int64)
        u = n * self.down + self._delay
        i = u // self.up
        p = u % self.up
        s = i - (self.taps - 1) - self._buf_start
        windows = np.lib.stride_tricks.sliding_window_view(self._buf, self.taps, axis=0)
        y = np.einsum("nck,nk->nc", windows[s], self._phases_rev[p])
        self.samples_out = top
        # keep only the history the next output needs
        next_i = (top * self.down + self._delay) // self.up
        keep_from = next_i - (self.taps - 1) - self._buf_start
        if keep_from > 0:
            self._buf = self._buf[keep_from:].copy()
            self._buf_start += keep_from
        return y
