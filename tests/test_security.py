"""Security: what a hostile name, a sink name, an option value or a datagram can make the library do.

- Output paths: user names (display names, nicknames), guild names and the file-name templates
  never steer a file outside the sink's directory, for every sink this project publishes; two
  users whose names collide get two files.
- Plugins: only the installed entry points of ``listening_core.sinks`` are ever imported; a sink
  name or an option value that looks like an import path imports nothing.
- Pickle: nothing that came from the network is unpickled (an AST scan of ``listening_core``,
  and a malicious pickle sent to a listening bot in every way a datagram can arrive).
- Options: every option (of the sinks and of the session) is checked before anything starts:
  no worker process, thread, socket change, file or directory comes of a call that raises.
"""

from __future__ import annotations

import ast
import asyncio
import collections
import importlib.metadata
import multiprocessing
import os
import pickle
import re
import socket
import sys
import threading
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import listening_core
from listening_core import AudioFrame, AudioSink, FrameKind, ListenOptions
from listening_core.hookspecs import ENTRY_POINT_GROUP
from listening_core.plugins import (
    KNOWN_DISTRIBUTIONS,
    OptionsError,
    SinkRegistry,
    UnknownSinkError,
    default_registry,
)
from listening_core.rtp import RtpHeader
from listening_core.sinks import RtcpPacket, SessionInfo, safe_filename
from listening_core.testing import LocalDiscord, Schedule, join_voice, record
from listening_core.testing.clients import close_client
from listening_core.testing.media import OpusEncoder, load_pcm, reference_decode

FRAME = 960
PROJECT_SINKS = sorted(KNOWN_DISTRIBUTIONS)  # wav, flac, mp3, ogg-opus, vad-segments, mixdown
WINDOWS_RESERVED = {"con", "prn", "aux", "nul"} | {
    f"{p}{n}" for p in ("com", "lpt") for n in [*range(10), *"¹²³"]
}
SLASH_LOOKALIKES = "/\\\u2215\uff0f\u2044\u29f8\u2571\u0338\ufe68\uff3c"

# user names as hostile as Discord lets them be (and more): traversal, absolute paths, device
# names, NUL and control characters, look-alike slashes and dots, bidirectional overrides, huge
# names, and names that collide with each other once made safe
HOSTILE_NAMES = [
    "../../etc/passwd",
    "../../../../../../../../../../etc/passwd",
    "/abs/path",
    "..",
    ".",
    "",
    " ",
    "con",
    "CON.wav",
    "nul.txt",
    "lpt1",
    "COM\u00b9.txt",  # COM¹: reserved too
    "a\x00b",
    "\x00",
    "\\..\\",
    "..\\..\\windows\\system32",
    "\uff0e\uff0e\uff0fetc\uff0fpasswd",  # fullwidth full stops and solidus
    "\u2215etc\u2215passwd",  # division slash
    "\u2044tmp\u2044x",  # fraction slash
    "\u202etxt.exe",  # right-to-left override
    "\u200f\u200e\u2066evil\u2069",  # marks and isolates
    "line\nbreak\r\n../x",
    "~",
    "~root/.ssh/authorized_keys",
    "$HOME",
    "%APPDATA%",
    ".hidden",
    "-rf",
    "x" * 10_000,
    "é" * 10_000,
    "\U0001f600" * 5_000,
    "alice",
    "Alice",
    "ALICE",
    "../x",
    "/x",
    "\\x",
    "_x",
    "_x-2",
]


# ------------------------------------------------------------------------------------ helpers


def _clip_frames(frames: int = 50) -> list[tuple[bytes, bytes]]:
    """(Opus, PCM) of the first ``frames`` 20 ms frames of the first phrase of three-phrases."""
    pcm = load_pcm("three-phrases")[: frames * FRAME * 4]
    opus = OpusEncoder().encode_pcm(pcm)
    decoded = reference_decode(opus)
    return [(o, decoded[i * FRAME * 4 : (i + 1) * FRAME * 4]) for i, o in enumerate(opus)]


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` (relative, as text) with its size and mtime (files only)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            found[str(Path(dirpath, name).relative_to(root))] = (0, 0)
        for name in filenames:
            path = Path(dirpath, name)
            st_ = path.lstat()
            found[str(path.relative_to(root))] = (st_.st_size, st_.st_mtime_ns)
    return found


def _listing(path: str) -> set[str]:
    try:
        return set(os.listdir(path))
    except OSError:
        return set()


def _file_options(name: str, out: Path, hostile_template: bool) -> dict[str, Any]:
    """Options for sink ``name`` writing into ``out``; with ``hostile_template``, the file-name
    template itself tries to climb out and uses every placeholder that carries a name or id."""
    options: dict[str, Any] = {"directory": str(out)}
    if name == "transcribe":
        # its files have fixed names (transcript.*; kept audio is named by user id only): no
        # template to make hostile. Its engine is a server that refuses every request, so
        # utterances are counted as failed and the transcript files are still written.
        return options | {
            "engine": "openai",
            "engine_options": {"base_url": "http://127.0.0.1:9/v1", "timeout": 5.0},
        }
    if not hostile_template:
        return options
    if name == "mixdown":
        options["filename"] = "../../{guild_id}/{channel_id}/../{started}"
    elif name == "vad-segments":
        options["template"] = "../../{guild_id}/{user}/../{index}/{start_ms}"
    elif name == "ogg-opus":
        options["template"] = "../{guild_id}/{channel_id}/../../{user}"
    else:
        options["template"] = "/../{guild_id}/{channel_id}/{user}/../{user_id}"
    return options


def _users_of(sink: Any) -> dict[int, set[Path]]:
    """Each user's files, as the sink reports them (per-user sinks only)."""
    files: dict[int, set[Path]] = collections.defaultdict(set)
    if hasattr(sink, "segments"):  # vad-segments
        for segment in sink.segments:
            files[segment.user_id].add(segment.path)
    elif hasattr(sink, "tracks"):  # ogg-opus
        for user_id, path in sink.files.items():
            files[user_id].add(path)
    else:  # the AudioFileSink family
        for user_id, path in sink.paths.items():
            files[user_id].add(path)
    return files


def _check_name(name: str) -> None:
    """A file name that is one harmless path component on every common system."""
    assert name and name not in (".", "..") and not name.startswith("."), repr(name)
    assert not any(ch in SLASH_LOOKALIKES for ch in name), repr(name)
    assert not any(unicodedata.category(ch)[0] == "C" for ch in name), repr(name)
    assert len(name.encode()) <= 255, len(name.encode())
    assert name.split(".")[0].lower() not in WINDOWS_RESERVED, repr(name)
    assert name == name.strip(" ."), repr(name)


# ----------------------------------------------------------------------------- file names


@settings(max_examples=500, deadline=None)
@given(name=st.text(max_size=300), fallback=st.text(max_size=50))
def test_safe_filename_is_always_one_harmless_component(name: str, fallback: str) -> None:
    result = safe_filename(name, fallback=fallback)
    _check_name(result)
    assert len(result.encode()) <= 200  # room for "-NN" and any extension within 255 bytes
    base = Path("/srv/recordings")
    assert (base / result).resolve().parent == base
    assert (base / (result + ".wav")).resolve().parent == base


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_safe_filename_of_hostile_names(name: str) -> None:
    result = safe_filename(name, fallback="123")
    _check_name(result)
    _check_name(result + ".wav")


@pytest.mark.parametrize("hostile_template", [False, True], ids=["default-template", "hostile-template"])
@pytest.mark.parametrize("sink_name", PROJECT_SINKS)
def test_no_name_steers_a_file_outside_the_output_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sink_name: str, hostile_template: bool
) -> None:
    """Every hostile user name records a frame into the sink (by name, through the registry):
    every file it creates is inside its directory, nothing appears anywhere else, and users
    whose names collide get files of their own."""
    root = tmp_path / "root"
    out, sentinel, cwd = root / "out", root / "sentinel", root / "cwd"
    sentinel.mkdir(parents=True)
    (sentinel / "keep.txt").write_text("untouched")
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # a sink that ignored its directory would write here
    outside = {p: _listing(p) for p in ("/", "/etc", str(tmp_path.parent))}  # (/tmp is shared)
    before = _tree(tmp_path)

    sink = default_registry().create(sink_name, _file_options(sink_name, out, hostile_template))
    sink.on_start(SessionInfo(guild_id=4242, channel_id=77, started_at=time.time()))
    clip = _clip_frames()
    users = {1000 + i: SimpleNamespace(display_name=name) for i, name in enumerate(HOSTILE_NAMES)}
    for k, (opus, pcm) in enumerate(clip):  # everyone speaks at once, the same phrase
        for user_id, member in users.items():
            frame = AudioFrame(user_id, user_id, k, k * FRAME, k * FRAME, FrameKind.RECEIVED, pcm, opus)
            frame.member = member  # type: ignore[assignment]
            sink.on_audio(frame)
    sink.on_stop(len(clip) * FRAME + 48_000)
    sink.cleanup()

    after = _tree(tmp_path)
    created = [tmp_path / p for p in sorted(set(after) - set(before))]
    assert created, "the sink wrote nothing"
    for path in created:
        resolved = path.resolve()
        assert resolved == out.resolve() or resolved.is_relative_to(out.resolve()), path
        assert path.parent == out or path == out, path  # flat: no subdirectories either
        if path != out:
            _check_name(path.name)
    assert {p: v for p, v in after.items() if not p.startswith("root/out")} == {
        p: v for p, v in before.items() if not p.startswith("root/out")
    }
    assert (sentinel / "keep.txt").read_text() == "untouched" and not any(cwd.iterdir())
    assert {p: _listing(p) for p in outside} == outside
    assert not Path("/abs").exists()

    if sink_name == "mixdown":
        assert len([p for p in created if p.suffix == ".wav"]) == 1
        return
    if sink_name == "transcribe":  # one transcript for everybody, the names only inside it
        assert {p.name for p in created if p != out} == {
            "transcript.jsonl",
            "transcript.srt",
            "transcript.vtt",
        }
        return
    # collisions: every user has files of their own (and got at least one)
    files = _users_of(sink)
    assert set(files) == set(users)
    every = [path for paths in files.values() for path in paths]
    assert len(every) == len(set(every)), "two users share a file"
    assert all(path.parent == out and path.exists() for path in every)


async def test_hostile_member_names_through_the_loopback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Members with hostile display names (and a hostile guild name) speak through the loopback
    into every project sink at once, all writing into one directory: every file is in it."""
    root = tmp_path / "root"
    out, sentinel, cwd = root / "out", root / "sentinel", root / "cwd"
    sentinel.mkdir(parents=True)
    (sentinel / "keep.txt").write_text("untouched")
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    outside = {p: _listing(p) for p in ("/", "/etc", str(tmp_path.parent))}
    before = _tree(tmp_path)
    names = ["../../etc/passwd", "\uff0e\uff0e\uff0fx\u202e", "con", "."]
    clips = ["alice", "bob", "carol", "dave"]
    async with LocalDiscord(guild_name="../../guild\x00/..") as local:
        rec = await record(
            local,
            PROJECT_SINKS,  # type: ignore[arg-type]  # listen() takes a list of names too
            options={name: _file_options(name, out, hostile_template=True) for name in PROJECT_SINKS},
            schedules={
                name: Schedule.from_clips([(clip, 0.0)]) for name, clip in zip(names, clips, strict=True)
            },
        )
    assert rec.error is None
    after = _tree(tmp_path)
    created = [tmp_path / p for p in sorted(set(after) - set(before))]
    for path in created:
        assert path == out or path.parent == out, path
        assert path.resolve().is_relative_to(out.resolve())
        if path != out:
            _check_name(path.name)
    assert (sentinel / "keep.txt").read_text() == "untouched" and not any(cwd.iterdir())
    assert {p: _listing(p) for p in outside} == outside
    ids = set(rec.user_ids.values())
    for name in ("wav", "flac", "mp3", "ogg-opus", "vad-segments"):
        files = _users_of(rec.sink[name])  # type: ignore[index]
        assert set(files) == ids, name
        every = [p for paths in files.values() for p in paths]
        assert len(every) == len(set(every)) and all(p.exists() for p in every), name
    assert rec.sink["mixdown"].path.parent == out  # type: ignore[index]


# ---------------------------------------------------------------------------- entry points

SENTINEL = "lc_security_sentinel"
SENTINEL_CODE = """
import pathlib
pathlib.Path({marker!r}).open("a").write(__name__ + "\\n")  # proof that this was imported

from dataclasses import dataclass
from listening_core.hookspecs import SinkSpec, hookimpl
from listening_core.sinks import AudioSink


class Sink(AudioSink):
    def on_audio(self, frame):
        pass


@dataclass(frozen=True)
class Options:
    pass


@hookimpl
def listening_sinks():
    return [SinkSpec("lc-security-sentinel", lambda options: Sink(), Options, "must never be loaded")]
"""


@pytest.fixture
def sentinel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A package, a submodule and a module on ``sys.path`` that record their import in the
    returned marker file; each also provides a sink plugin. None of it is installed."""
    marker = tmp_path / "imported.txt"
    lib = tmp_path / "lib"
    (lib / SENTINEL).mkdir(parents=True)
    code = SENTINEL_CODE.format(marker=str(marker))
    (lib / SENTINEL / "__init__.py").write_text(code)
    (lib / SENTINEL / "sub.py").write_text(code)
    (lib / f"{SENTINEL}_flat.py").write_text(code)
    monkeypatch.syspath_prepend(str(lib))
    default_registry()  # the installed plugins are loaded (once per process) before the checks
    yield marker
    for name in [m for m in sys.modules if m.startswith(SENTINEL)]:
        del sys.modules[name]


def _import_paths(lib: Path) -> list[str]:
    return [
        SENTINEL,
        SENTINEL.replace("_", "-"),
        "lc-security-sentinel",  # the sink name the uninstalled plugin would provide
        f"{SENTINEL}:Sink",
        f"{SENTINEL}.sub",
        f"{SENTINEL}.sub:Sink",
        f"{SENTINEL}_flat",
        f"{SENTINEL}_flat:listening_sinks",
        str(lib / f"{SENTINEL}_flat.py"),
        f"./{SENTINEL}_flat.py",
        f"{SENTINEL}/__init__.py",
        "../x",
        "os.path",
        "os:system",
        "listening_core.sinks:AudioFileSink",
        "listening_sink_wav:listening_sinks",
        "pkg:attr",
        "__import__('os').system('true')",
        f"file://{lib}/{SENTINEL}_flat.py",
    ]


def test_a_sink_name_is_never_imported(sentinel: Path, tmp_path: Path) -> None:
    """Module paths, entry-point references and file paths as sink names: nothing is imported,
    and the error says a sink is chosen among the installed ones."""
    registry = default_registry()
    modules = set(sys.modules)
    for name in _import_paths(tmp_path / "lib"):
        for attempt in (registry.get, registry.create, registry.validate_options):
            with pytest.raises(UnknownSinkError) as caught:
                attempt(name)
            message = str(caught.value)
            assert message.startswith(f"unknown sink {name!r}") and "installed sinks:" in message
            if any(ch in name for ch in ".:/\\("):
                assert "never imported" in message, message  # the fix, for someone who tried
            else:
                assert "pip install" in message, message  # a plain name: the plugin to install
    assert set(sys.modules) == modules, sorted(set(sys.modules) - modules)
    assert not sentinel.exists(), sentinel.read_text()
    # a plugin's module or distribution name points to its sinks (without importing anything)
    for name in ("listening_sink_wav", "listening-sink-wav", "listening_sink_wav:listening_sinks"):
        with pytest.raises(UnknownSinkError) as caught:
            registry.get(name)
        assert caught.value.suggestions[0] == "wav" and caught.value.install is None, str(caught.value)
    # a project plugin's distribution name, where that plugin is not installed: what to install
    with pytest.raises(UnknownSinkError) as caught:
        SinkRegistry(entry_points=lambda: []).get("listening-sink-transcribe")
    assert caught.value.install == "listening-sink-transcribe"


def test_only_installed_entry_points_are_loaded(sentinel: Path) -> None:
    """The registry's plugins are exactly the importable entry points of the group."""
    registry = default_registry()
    installed = {ep.value.split(":")[0] for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    plugins = {getattr(p, "__name__", type(p).__module__) for p in registry.plugin_manager.get_plugins()}
    assert plugins <= installed, plugins - installed
    assert set(PROJECT_SINKS) <= set(registry.names())
    assert "lc-security-sentinel" not in registry
    assert not sentinel.exists()


def test_option_values_that_look_like_import_paths_are_not_imported(
    sentinel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every option of every installed sink, given an import path as its value: it is taken as
    data (a file name, a directory) or refused; nothing is imported."""
    registry = default_registry()
    for spec in registry.specs():  # warm up: what building a sink imports by itself (webrtcvad...)
        monkeypatch.chdir(tmp_path)
        warm = (
            {"directory": str(tmp_path / "warm")} if "directory" in spec.options.__dataclass_fields__ else {}
        )
        registry.create(spec.name, warm).cleanup()
    modules = set(sys.modules)
    outcomes: collections.Counter[str] = collections.Counter()
    for spec in registry.specs():
        fields = [info.name for info in listening_core.plugins.describe(spec)]
        for field_name in fields:
            for value in (f"{SENTINEL}:Sink", f"{SENTINEL}.sub", f"{SENTINEL}_flat"):
                here = tmp_path / "cwd" / spec.name / field_name / value
                here.mkdir(parents=True)
                monkeypatch.chdir(here)  # files and directories named after the value land here
                options = {field_name: value}
                for place in ("directory", "path"):  # keep the sink's own files in tmp_path
                    if place in fields and place != field_name:
                        options[place] = str(here / "out" / place)
                try:
                    sink = registry.create(spec.name, options)
                except (OptionsError, ValueError):
                    outcomes["refused"] += 1
                    continue
                outcomes["taken as data"] += 1
                sink.cleanup()
    assert outcomes["refused"] and outcomes["taken as data"]  # both kinds of option were tried
    assert set(sys.modules) == modules, sorted(set(sys.modules) - modules)
    assert not sentinel.exists(), sentinel.read_text()


# ------------------------------------------------------------------------------------ pickle

PACKAGE = Path(listening_core.__file__).parent
UNPICKLING_MODULES = {
    "pickle",
    "_pickle",
    "cPickle",
    "dill",
    "cloudpickle",
    "marshal",
    "shelve",
    "jsonpickle",
    "joblib",
}
MP_PICKLING = {"Queue", "SimpleQueue", "JoinableQueue", "Manager", "Listener", "Client", "Pool"}
# The only places that unpickle: the two ends of a decoding worker's pipe (made by the pool
# with multiprocessing.Pipe; they carry the pool's own tuples of ints and bytes), and the
# worker checking that an exception it made survives pickling before it sends it.
ALLOWED_UNPICKLING = {
    ("pool.py", "AudioProcessPool._receive", "Connection.recv"),
    ("unpacker.py", "AudioUnpacker.run", "Connection.recv"),
    ("unpacker.py", "_portable", "pickle.loads"),
}


class _UnpicklingFinder(ast.NodeVisitor):
    """Every call that unpickles (or runs code from data) in one module, by function."""

    def __init__(self, module: str) -> None:
        self.module = module
        self.scope: list[str] = []
        self.aliases: dict[str, str] = {}  # local name -> "pickle" / "pickle.loads" / "multiprocessing"
        self.found: list[tuple[str, str, str, ast.AST]] = []

    def _add(self, what: str, node: ast.AST) -> None:
        self.found.append((self.module, ".".join(self.scope) or "<module>", what, node))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            root = alias.name.split(".")[0]
            if root in UNPICKLING_MODULES or root == "multiprocessing":
                self.aliases[alias.asname or root] = alias.name if alias.asname else root
            if root in UNPICKLING_MODULES - {"pickle", "_pickle"}:
                self._add(f"import {alias.name}", node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        root = (node.module or "").split(".")[0]
        for alias in node.names:
            if root in UNPICKLING_MODULES:
                self.aliases[alias.asname or alias.name] = f"{root}.{alias.name}"
                self._add(f"from {node.module} import {alias.name}", node)
            elif root == "multiprocessing" and alias.name in MP_PICKLING:
                self._add(f"from {node.module} import {alias.name}", node)

    def _scoped(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped

    def _root(self, node: ast.AST) -> str | None:
        while isinstance(node, ast.Attribute | ast.Call):  # multiprocessing.get_context().Queue
            node = node.value if isinstance(node, ast.Attribute) else node.func
        return self.aliases.get(node.id) if isinstance(node, ast.Name) else None

    def visit_Attribute(self, node: ast.Attribute) -> None:
        root = self._root(node.value)
        if root == "multiprocessing" and node.attr in MP_PICKLING:
            self._add(f"multiprocessing {node.attr}", node)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Attribute):
            root = self._root(func.value)
            if root in UNPICKLING_MODULES and func.attr in {"load", "loads", "Unpickler"}:
                self._add(f"{root}.{func.attr}", node)
            elif func.attr == "recv":  # multiprocessing's Connection.recv unpickles
                self._add("Connection.recv", node)
        elif isinstance(func, ast.Name):
            target = self.aliases.get(func.id, "")
            if target.split(".")[0] in UNPICKLING_MODULES:
                self._add(target, node)
            elif func.id in {"eval", "exec", "__import__"}:
                self._add(func.id, node)
        self.generic_visit(node)


def _unpickling_sites() -> list[tuple[str, str, str, ast.AST]]:
    sites = []
    for path in sorted(PACKAGE.rglob("*.py")):
        finder = _UnpicklingFinder(str(path.relative_to(PACKAGE)))
        finder.visit(ast.parse(path.read_text(), str(path)))
        sites.extend(finder.found)
    return sites


def test_only_the_pool_pipes_unpickle() -> None:
    """Structural: in the whole package (the loopback included), the only unpickling is on the
    decoding workers' pipes; nothing else loads pickles, marshal data or runs code from data."""
    sites = _unpickling_sites()
    assert {(module, where, what) for module, where, what, _ in sites} == ALLOWED_UNPICKLING, sites
    # the pipes are the pool's own: made with multiprocessing.Pipe, one end given to the worker
    pool = ast.parse((PACKAGE / "pool.py").read_text())
    calls = [ast.unparse(node.func) for node in ast.walk(pool) if isinstance(node, ast.Call)]
    assert "multiprocessing.Pipe" in calls and "AudioUnpacker" in calls
    # and the one pickle.loads reads back what the line itself has just pickled
    [(_, _, _, loads)] = [site for site in sites if site[2] == "pickle.loads"]
    assert isinstance(loads, ast.Call) and ast.unparse(loads.args[0]).startswith("pickle.dumps(")


def test_the_scan_finds_unpickling() -> None:
    """The scan above is not blind: each way of unpickling, in a module, is found."""
    snippets = {
        "import pickle\ndef f(d):\n    return pickle.loads(d)": "pickle.loads",
        "import pickle as p\ndef f(fh):\n    return p.load(fh)": "pickle.load",
        "from pickle import loads\ndef f(d):\n    return loads(d)": "pickle.loads",
        "import marshal": "import marshal",
        "def f(conn):\n    return conn.recv()": "Connection.recv",
        "import multiprocessing\nq = multiprocessing.Queue()": "multiprocessing Queue",
        "import multiprocessing as mp\nq = mp.get_context('spawn').SimpleQueue()": "multiprocessing SimpleQueue",
        "from multiprocessing.connection import Listener": "from multiprocessing.connection import Listener",
        "def f(s):\n    return eval(s)": "eval",
    }
    for code, what in snippets.items():
        finder = _UnpicklingFinder("m.py")
        finder.visit(ast.parse(code))
        assert any(found[2] == what for found in finder.found), (code, finder.found)


class _Boom:
    """Unpickling this creates a directory: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.marker,))


class _Collecting(AudioSink):
    def __init__(self) -> None:
        self.frames: dict[int, list[AudioFrame]] = collections.defaultdict(list)
        self.rtcp: list[RtcpPacket] = []

    def on_audio(self, frame: AudioFrame) -> None:
        self.frames[frame.user_id].append(frame)

    def on_rtcp(self, packet: RtcpPacket) -> None:
        self.rtcp.append(packet)


def _drops(vc: Any) -> int:
    receiver = vc._receiver or vc._last_receiver
    stats = receiver.stats.values()
    return sum(receiver.unattributed.values()) + sum(
        sum(s.dropped.values()) + s.dave_failures + s.corrupt for s in stats
    )


async def test_a_malicious_pickle_from_the_network_never_runs(tmp_path: Path) -> None:
    """Datagrams carrying a pickle whose loading would create a directory, in every way one can
    reach a listening bot: the directory never appears, each garbage datagram is counted as a
    drop, and the member speaking at the same time is recorded intact."""
    marker = tmp_path / "pwned"
    payloads = [pickle.dumps(_Boom(marker), protocol=p) for p in range(pickle.HIGHEST_PROTOCOL + 1)]
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Boom(probe)))  # the payload is live: loading it does create it
    assert probe.is_dir()
    async with LocalDiscord() as local:
        alice = local.add_member("alice")
        await alice.join()
        client, vc = await join_voice(local)
        try:
            call = local.calls[local.world.voice_channel_id]
            assert client.user is not None
            bot = call.sessions[client.user.id]
            sink = _Collecting()
            vc.listen(sink, listen_options=ListenOptions(unmapped_hold=0.2))
            speaking = alice.speak(Schedule.from_clips([("alice", 0.0)]))
            await asyncio.sleep(0.3)

            async def counted(send: Any, what: str) -> None:
                for payload in payloads:
                    drops = _drops(vc)
                    send(payload)
                    deadline = time.monotonic() + 5
                    while _drops(vc) == drops:
                        assert time.monotonic() < deadline, (
                            f"{what} (protocol {payload[:2]!r}) was not counted"
                        )
                        await asyncio.sleep(0.01)

            # 1. the raw bytes, straight at the bot's socket
            await counted(lambda data: call.relay.send_raw(data, bot), "a raw pickle")
            # 2. behind an RTP header with alice's SSRC, not sealed with the transport key
            header = RtpHeader(sequence=1, timestamp=2, ssrc=alice.ssrc, payload_type=120).serialize()
            await counted(lambda data: call.relay.send_raw(header + data, bot), "an unsealed RTP pickle")
            # 3. behind an RTCP header, not sealed
            rtcp = b"\x80\xc8\x00\x06" + alice.ssrc.to_bytes(4, "big")
            await counted(lambda data: call.relay.send_raw(rtcp + data, bot), "an unsealed RTCP pickle")
            # 4. sealed with the bot's transport key, from an SSRC nobody announced
            seq = iter(range(100, 200))

            def sealed(data: bytes) -> None:
                rtp = RtpHeader(
                    sequence=next(seq), timestamp=960 * 5, ssrc=alice.ssrc ^ 0x5A5A, payload_type=120
                )
                call.relay.forward_rtp(alice, rtp, data)

            await counted(sealed, "a sealed pickle from an unknown SSRC")
            # 5. a sealed RTCP packet carrying it reaches on_rtcp as bytes, and only as bytes
            call.relay.forward_rtcp(alice, b"\x80\xc8\x00\x06" + alice.ssrc.to_bytes(4, "big") + payloads[-1])
            await speaking
            # 6. alice herself sends it as audio frames, DAVE-encrypted: each is decoded as Opus
            #    in a worker (crossing the pool's pipe as bytes inside the pool's own tuple)
            odd = [alice.send_frame(payload) for payload in payloads]
            await asyncio.sleep(0.5)
            vc.stop_listening()
            await vc.wait_for_listen_ready(15)
            stats = vc.listening_stats()[alice.user_id]
        finally:
            await close_client(client)
    assert not marker.exists()
    assert any(p.data.endswith(payloads[-1]) for p in sink.rtcp)
    frames = sink.frames[alice.user_id]
    assert [f.sequence for f in frames] == [s.sequence for s in alice.sent]  # one frame per frame sent
    speech = frames[: -len(odd)]
    assert all(f.kind in (FrameKind.RECEIVED, FrameKind.SILENCE) for f in speech)
    assert b"".join(f.pcm or b"" for f in speech) == reference_decode(s.opus for s in alice.sent[: -len(odd)])
    # the pickles as Opus: what libopus refuses is concealed and counted; the rest is (noise) audio
    # from alice, who may send any bytes she likes as her voice: it is just bytes to a decoder
    concealed = [f for f in frames[-len(odd) :] if f.kind is FrameKind.PLC]
    assert stats.corrupt == stats.concealed == len(concealed)
    assert all(f.kind in (FrameKind.RECEIVED, FrameKind.PLC) for f in frames[-len(odd) :])
    assert set(sink.frames) == {alice.user_id}


# ----------------------------------------------------------------------------------- options


def _child_processes() -> set[int]:
    """PIDs of this process's children, from /proc (whatever started them)."""
    children = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
                children.add(int(entry))
    return children


def _state(vc: Any, tmp_path: Path) -> dict[str, Any]:
    """Everything a session that started would have changed."""
    conn = vc._connection
    return {
        "children": _child_processes(),
        "multiprocessing": set(multiprocessing.active_children()),
        "threads": set(threading.enumerate()),
        "files": _tree(tmp_path),
        "receiver": (vc._receiver, vc._last_receiver, vc._attached, vc._reading, vc.is_listening()),
        "socket buffer": conn.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
        "socket listeners": list(conn._socket_reader._callbacks),
    }


async def test_options_are_checked_before_anything_starts(tmp_path: Path) -> None:
    """A listen() whose options are wrong raises, and leaves no process, thread, socket change,
    file or directory behind: nothing had started."""
    out = tmp_path / "out"
    lone = tmp_path / "lone"
    given_sink = _Collecting()
    cases: list[tuple[dict[str, Any], type[BaseException], str]] = [
        ({"sink": "wav", "options": {"directory": str(out), "nope": 1}}, OptionsError, "no option 'nope'"),
        ({"sink": "wav", "options": {"directory": str(out), "channels": "2"}}, OptionsError, "'channels'"),
        ({"sink": "wav", "options": {"directory": str(out), "template": "{nope}"}}, OptionsError, "{nope}"),
        ({"sink": "wav", "options": {"directory": str(out), "sample_rate": 7}}, OptionsError, "sample_rate"),
        ({"sink": "wav", "options": {"directory": 5}}, OptionsError, "'directory'"),
        ({"sink": "wav", "options": "directory=out"}, OptionsError, "must be None, a dict"),
        (
            {"sink": "mixdown", "options": {"directory": str(out), "filename": "{user}"}},
            OptionsError,
            "filename",
        ),
        (
            {"sink": "vad-segments", "options": {"directory": str(out), "on_segment": "os:system"}},
            OptionsError,
            "on_segment",
        ),
        (
            {"sink": "vad-segments", "options": {"directory": str(out), "manifest": "../m.jsonl"}},
            OptionsError,
            "manifest",
        ),
        ({"sink": "no-such-sink", "options": {"directory": str(out)}}, UnknownSinkError, "unknown sink"),
        ({"sink": "os.path", "options": {"directory": str(out)}}, UnknownSinkError, "never imported"),
        ({"sink": ["wav"], "options": {"mp3": {"directory": str(out)}}}, ValueError, "'mp3'"),
        ({"sink": ["wav", "nope"], "options": {"wav": {"directory": str(out)}}}, UnknownSinkError, "'nope'"),
        (
            {
                "sink": ["wav", "ogg-opus", "vad-segments"],
                "options": {
                    "wav": {"directory": str(out / "wav")},
                    "ogg-opus": {"directory": str(out / "ogg")},
                    "vad-segments": {"directory": str(out / "vad"), "frame_ms": 25},  # the last one is bad
                },
            },
            OptionsError,
            "frame_ms",
        ),
        ({"sink": ["wav", "wav"]}, ValueError, "twice"),
        ({"sink": []}, ValueError, "empty"),
        ({"sink": ["wav"], "options": {"directory": str(out)}}, ValueError, "not among the sinks"),
        (
            {"sink": given_sink, "options": {"directory": str(lone)}},
            Exception,
            "options apply to a sink given by name",
        ),
        (
            {"sink": "wav", "options": {"directory": str(out)}, "listen_options": {"tick": 0.1}},
            TypeError,
            "ListenOptions",
        ),
        ({"sink": given_sink, "listen_options": "fast"}, TypeError, "ListenOptions"),
        ({"sink": 42}, TypeError, "AudioSink"),
    ]
    async with LocalDiscord() as local:
        alice = local.add_member("alice")
        await alice.join()
        client, vc = await join_voice(local)
        try:
            alice.speak(Schedule.from_clips([("alice", 0.0)]))  # a session would have audio to take
            for kwargs, error, text in cases:
                before = _state(vc, tmp_path)
                with pytest.raises(error, match=re.escape(text)):
                    vc.listen(**kwargs)
                assert _state(vc, tmp_path) == before, kwargs  # taken at once: nothing ran meanwhile
            # and a good call does start all of that (the state above can tell)
            before = _state(vc, tmp_path)
            vc.listen("wav", options={"directory": str(out)})
            assert _state(vc, tmp_path) != before
            vc.stop_listening()
            await vc.wait_for_listen_ready(15)
        finally:
            await close_client(client)


@pytest.mark.parametrize(
    "bad",
    [
        {"tick": 0},
        {"tick": -1},
        {"tick": float("inf")},
        {"jitter_delay": "x"},
        {"jitter_delay": -0.1},
        {"dave_hold": float("nan")},
        {"unmapped_hold": -1},
        {"speaking_timeout": True},
        {"max_held_per_stream": 0},
        {"max_held_per_stream": 1.5},
        {"stop_grace": -1},
        {"spurt_gap": None},
    ],
)
def test_session_options_are_checked_when_made(bad: dict[str, Any]) -> None:
    """ListenOptions refuses what would break a session once it runs (a receiver thread dying on
    a bad sleep, a busy loop, a type error), when it is made: before listen() is even called."""
    with pytest.raises((TypeError, ValueError), match=next(iter(bad))):
        ListenOptions(**bad)
