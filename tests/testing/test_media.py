from __future__ import annotations

import itertools
import json
import math
import pathlib

import numpy as np
import pytest
import soundfile as sf

from listening_core.testing.media import (
    FRAME_BYTES,
    FRAME_SAMPLES,
    OPUS_DELAY_SAMPLES,
    SAMPLE_RATE,
    SILENCE_FRAME,
    SILENCE_TAIL_FRAMES,
    OpusEncoder,
    Schedule,
    Spurt,
    clip_path,
    list_clips,
    load_pcm,
    reference_decode,
)

# Sample counts per channel, as documented in listening_core/testing/clips/README.md.
CLIP_SAMPLES = {
    "alice": 139_751,
    "bob": 122_663,
    "carol": 111_236,
    "dave": 128_788,
    "meeting-alice": 130_427,
    "meeting-bob": 134_010,
    "meeting-carol": 110_495,
    "three-phrases": 230_958,
}


def left(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, "<i2").reshape(-1, 2)[:, 0].astype(np.float64)


def best_lag(reference: np.ndarray, delayed: np.ndarray, max_lag: int = 600) -> tuple[int, float]:
    """The lag of `delayed` behind `reference` with the highest correlation, and that correlation."""
    n = len(reference) - max_lag
    scores = [float(np.corrcoef(reference[:n], delayed[lag : lag + n])[0, 1]) for lag in range(max_lag)]
    lag = int(np.argmax(scores))
    return lag, scores[lag]


def test_clip_list_and_paths() -> None:
    assert list_clips() == sorted(CLIP_SAMPLES)
    assert clip_path("alice") == clip_path("alice.flac")
    assert clip_path("alice").suffix == ".flac"
    with pytest.raises(FileNotFoundError, match="alice"):
        clip_path("nobody")


def test_clips_are_small() -> None:
    directory = clip_path("alice").parent
    # eight clips of 2-5 s of speech (FLAC) and their notes: what a wheel can carry without notice
    assert sum(path.stat().st_size for path in directory.iterdir()) < 800_000


@pytest.mark.parametrize("name", sorted(CLIP_SAMPLES))
def test_clip_loads_as_48k_stereo_with_documented_length(name: str) -> None:
    info = sf.info(str(clip_path(name)))
    assert (info.samplerate, info.subtype) == (SAMPLE_RATE, "PCM_16")
    pcm = load_pcm(name)
    assert len(pcm) == CLIP_SAMPLES[name] * 4
    stereo = np.frombuffer(pcm, "<i2").reshape(-1, 2)
    assert np.array_equal(stereo[:, 0], stereo[:, 1])  # mono duplicated
    assert np.abs(stereo).max() > 10_000  # actually speech, not silence
    if name != "three-phrases":
        assert 2.0 <= CLIP_SAMPLES[name] / SAMPLE_RATE <= 4.0
    assert load_pcm(clip_path(name)) == pcm


def test_load_pcm_refuses_other_rates(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "cd.wav"
    sf.write(str(path), np.zeros(441, dtype=np.int16), 44_100)
    with pytest.raises(ValueError, match="44100"):
        load_pcm(path)


def test_load_pcm_keeps_stereo(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "stereo.wav"
    data = np.array([[1, -2], [3, -4]], dtype=np.int16)
    sf.write(str(path), data, SAMPLE_RATE)
    assert load_pcm(str(path)) == data.astype("<i2").tobytes()


def test_three_phrases_boundaries_match_the_audio() -> None:
    info = json.loads(clip_path("three-phrases").with_suffix(".json").read_text())
    mono = np.frombuffer(load_pcm("three-phrases"), "<i2")[::2]
    assert info["sample_rate"] == SAMPLE_RATE and info["total_samples"] == len(mono)
    phrases = info["phrases"]
    assert len(phrases) == len(info["texts"]) == 3
    edges = [0] + [x for p in phrases for x in (p["start_sample"], p["end_sample"])] + [len(mono)]
    silences = [mono[a:b] for a, b in zip(edges[::2], edges[1::2], strict=True)]
    assert all(not s.any() for s in silences)  # digital silence exactly where stated
    assert [len(s) for s in silences[1:-1]] == [SAMPLE_RATE, SAMPLE_RATE]  # exactly 1.0 s between phrases
    for p in phrases:
        start, end = p["start_sample"], p["end_sample"]
        assert mono[start] != 0 and mono[end - 1] != 0  # the boundaries are tight
        assert (p["start_ms"], p["end_ms"]) == (round(start / 48), round(end / 48))
        assert end - start > SAMPLE_RATE // 4


def test_encode_pcm_frames_and_padding() -> None:
    encoder = OpusEncoder()
    assert encoder.encode_pcm(b"") == []
    frames = encoder.encode_pcm(b"\1\0" * 2 * (FRAME_SAMPLES + 10))
    assert len(frames) == 2 and all(0 < len(frame) < FRAME_BYTES for frame in frames)
    with pytest.raises(ValueError, match="4-byte"):
        encoder.encode_pcm(b"\0" * 6)
    with pytest.raises(ValueError, match="3840"):
        encoder.encode(b"\0" * 100)


def test_reference_decode_lengths_plc_and_silence() -> None:
    frames = OpusEncoder().encode_pcm(load_pcm("bob")[: 10 * FRAME_BYTES])
    pcm = reference_decode([*frames[:3], None, *frames[4:], SILENCE_FRAME])
    assert len(pcm) == 11 * FRAME_BYTES
    assert reference_decode([SILENCE_FRAME]) == bytes(FRAME_BYTES)
    assert reference_decode([]) == b""


@pytest.mark.parametrize("name", ["alice", "dave"])
def test_round_trip_correlates_after_the_opus_delay(name: str) -> None:
    pcm = load_pcm(name)
    frames = OpusEncoder().encode_pcm(pcm)
    assert len(frames) == math.ceil(len(pcm) / FRAME_BYTES)
    decoded = reference_decode(frames)
    assert len(decoded) == len(frames) * FRAME_BYTES
    lag, correlation = best_lag(left(pcm), left(decoded))
    # Speech goes out in hybrid mode (SILK+CELT), which lines up 2 samples earlier than the lookahead.
    assert abs(lag - OPUS_DELAY_SAMPLES) <= 2, lag
    assert correlation > 0.9


def test_opus_delay_is_the_encoder_lookahead() -> None:
    # Wideband noise is coded by CELT alone, whose delay is exactly the lookahead.
    noise = np.random.default_rng(0).normal(0, 4000, SAMPLE_RATE).astype("<i2")
    pcm = np.repeat(noise[:, None], 2, axis=1).tobytes()
    lag, _ = best_lag(left(pcm), left(reference_decode(OpusEncoder().encode_pcm(pcm))))
    assert lag == OPUS_DELAY_SAMPLES


def test_encoding_is_deterministic() -> None:
    pcm = load_pcm("carol")
    assert OpusEncoder().encode_pcm(pcm) == OpusEncoder().encode_pcm(pcm)


def test_schedule_frame_timing() -> None:
    schedule = Schedule.from_clips([("dave", 4.0), ("bob", 0.0)])
    bob, dave = schedule.spurts
    assert (bob.start, dave.start) == (0.0, 4.0)
    frames = list(schedule.frames())
    slots = [frame.slot for frame in frames]
    assert slots == sorted(set(slots))
    for frame in frames:
        assert frame.offset == pytest.approx(frame.slot * 0.02, abs=1e-12)
        assert frame.sample == frame.slot * FRAME_SAMPLES

    voice_bob = math.ceil(CLIP_SAMPLES["bob"] / FRAME_SAMPLES)
    voice_dave = math.ceil(CLIP_SAMPLES["dave"] / FRAME_SAMPLES)
    expected_slots = [
        *range(0, voice_bob + SILENCE_TAIL_FRAMES),
        *range(200, 200 + voice_dave + SILENCE_TAIL_FRAMES),
    ]
    assert slots == expected_slots  # 20 ms cadence inside each spurt, nothing in the gap
    tails = [frame.is_silence_tail for frame in frames]
    assert tails == (
        [False] * voice_bob
        + [True] * SILENCE_TAIL_FRAMES
        + [False] * voice_dave
        + [True] * SILENCE_TAIL_FRAMES
    )
    assert all((frame.opus == SILENCE_FRAME) == frame.is_silence_tail for frame in frames)
    assert schedule.slot_count == expected_slots[-1] + 1
    assert schedule.duration == pytest.approx(schedule.slot_count * 0.02)
    assert [f.opus for f in frames[:voice_bob]] == OpusEncoder().encode_pcm(load_pcm("bob"))


@pytest.mark.parametrize("base", [0, 123_456, 2**32 - 960 * 150])
def test_schedule_rtp_timestamps_follow_the_wall_clock(base: int) -> None:
    schedule = Schedule([Spurt(0.0, bytes(FRAME_BYTES * 3)), Spurt(1.0, bytes(FRAME_BYTES * 2))])
    frames = list(schedule.frames())
    timestamps = [frame.rtp_timestamp(base) for frame in frames]
    assert timestamps[0] == base
    for frame, timestamp in zip(frames, timestamps, strict=True):
        assert timestamp == (base + 960 * round(frame.offset / 0.02)) % 2**32
    steps = [(b - a) % 2**32 for a, b in itertools.pairwise(timestamps)]
    # 3 voice + 5 tail frames, then a gap from slot 8 to slot 50, then 2 voice + 5 tail frames
    assert steps == [960] * 7 + [960 * (50 - 7)] + [960] * 6


def test_spurt_start_rounds_to_the_nearest_slot() -> None:
    assert Spurt(0.031, bytes(4)).first_slot == 2
    assert Spurt(0.029, bytes(4)).first_slot == 1
    assert Spurt(0.5, bytes(4)).frame_count == 1


@pytest.mark.parametrize(
    ("start", "pcm"), [(-0.1, bytes(4)), (float("nan"), bytes(4)), (0.0, b""), (0.0, bytes(6))]
)
def test_spurt_validation(start: float, pcm: bytes) -> None:
    with pytest.raises(ValueError, match="Spurt"):
        Spurt(start, pcm)


def test_overlapping_spurts_are_refused() -> None:
    three_frames = bytes(3 * FRAME_BYTES)
    Schedule([Spurt(0.0, three_frames), Spurt(0.16, three_frames)])  # voice 0..2, tail 3..7, next at 8
    with pytest.raises(ValueError, match="before"):
        Schedule([Spurt(0.0, three_frames), Spurt(0.14, three_frames)])


def test_reference_pcm_places_frames_on_the_timeline() -> None:
    schedule = Schedule.from_clips([("alice", 0.5), ("carol", 4.0)])
    frames = list(schedule.frames())
    track = schedule.reference_pcm(frames)
    assert track == schedule.reference_pcm()
    assert len(track) == schedule.slot_count * FRAME_BYTES
    first_spurt = [frame for frame in frames if frame.slot < 200]
    start = first_spurt[0].sample * 4
    assert not any(track[:start])
    end = (first_spurt[-1].slot + 1) * FRAME_BYTES
    assert track[start:end] == reference_decode([frame.opus for frame in first_spurt])
    assert not any(track[end : 200 * FRAME_BYTES])
    lag, correlation = best_lag(left(load_pcm("carol")), left(track[200 * FRAME_BYTES :]))
    assert abs(lag - OPUS_DELAY_SAMPLES) <= 2 and correlation > 0.9
