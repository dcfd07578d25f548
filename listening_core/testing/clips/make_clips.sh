#!/usr/bin/env bash
# Regenerates the speech clips in this directory. Not run in CI: the clips are committed.
# Needs espeak-ng 1.51, sox 14.4 and a Python with numpy and soundfile ($PYTHON, default python3).
# -D everywhere: sox must not dither, or the "digital silence" would not be zeros.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# speak NAME VOICE PITCH SPEED TEXT: espeak-ng (22.05 kHz) -> 48 kHz 16-bit mono, edge silence trimmed
# to 50 ms (-50 dBFS), FLAC at the highest compression.
speak() {
    espeak-ng -v "$2" -p "$3" -s "$4" -w "$tmp/$1.wav" "$5"
    sox -D "$tmp/$1.wav" -r 48000 -b 16 "$tmp/$1-48k.wav" rate -v \
        silence 1 0.01 -50d reverse silence 1 0.01 -50d reverse pad 0.05 0.05
    sox -D "$tmp/$1-48k.wav" -C 8 "$1.flac"
}

speak alice en-us+f3 70 160 "The quick brown fox jumps over the lazy dog."
speak bob en-gb 30 150 "Testing one two three, can you hear me?"
speak carol en-gb-x-rp+f2 60 170 "Recording has started in the voice channel."
speak dave en-us+m3 40 140 "Seven silver spoons sat on the table."
# the transcription tests' meeting: plain sentences whose words a small speech model knows
speak meeting-alice en-us+f3 70 160 "Please send the weekly report to the whole team."
speak meeting-bob en-gb 30 150 "The meeting will start again after a short break."
speak meeting-carol en-gb-x-rp+f2 60 170 "We need a bigger room for the next workshop."

# three-phrases: 0.2 s of zeros, three phrases with their edges trimmed hard (-40 dBFS, no pad) and
# exactly 1.0 s of zeros between them, 0.2 s of zeros at the end.
i=0
for text in "Good morning." "Start the recording." "Thank you."; do
    i=$((i + 1))
    espeak-ng -v en-us -p 50 -s 160 -w "$tmp/p$i.wav" "$text"
    sox -D "$tmp/p$i.wav" -r 48000 -b 16 "$tmp/p$i-48k.wav" rate -v \
        silence 1 0.005 -40d reverse silence 1 0.005 -40d reverse
done
sox -D -n -r 48000 -c 1 -b 16 "$tmp/gap.wav" trim 0 48000s
sox -D -n -r 48000 -c 1 -b 16 "$tmp/edge.wav" trim 0 9600s
sox -D "$tmp/edge.wav" "$tmp/p1-48k.wav" "$tmp/gap.wav" "$tmp/p2-48k.wav" "$tmp/gap.wav" \
    "$tmp/p3-48k.wav" "$tmp/edge.wav" -C 8 three-phrases.flac

# Phrase boundaries measured from the audio: a phrase is a run of samples with |x| > 0 that no
# 0.5 s stretch of zeros interrupts; start is its first such sample, end one past its last.
"$PYTHON" - <<'PY'
import json

import numpy as np
import soundfile as sf

pcm, rate = sf.read("three-phrases.flac", dtype="int16")
loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > 0)
splits = np.flatnonzero(np.diff(loud) > rate // 2)
starts = [int(loud[0])] + [int(loud[s + 1]) for s in splits]
ends = [int(loud[s]) + 1 for s in splits] + [int(loud[-1]) + 1]
phrases = [
    {"start_sample": s, "end_sample": e, "start_ms": round(s * 1000 / rate), "end_ms": round(e * 1000 / rate)}
    for s, e in zip(starts, ends)
]
info = {
    "sample_rate": rate,
    "total_samples": len(pcm),
    "threshold": 0,
    "texts": ["Good morning.", "Start the recording.", "Thank you."],
    "phrases": phrases,
}
with open("three-phrases.json", "w") as f:
    json.dump(info, f, indent=2)
    f.write("\n")
PY
