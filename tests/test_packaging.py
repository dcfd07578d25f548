"""What a user gets from PyPI, checked before anything is published: every distribution of the
repository (the core, each ``plugins/*`` sink, the template) built into one wheelhouse with the
third-party wheels they need, then installed from that wheelhouse alone into fresh virtual
environments.

These tests build wheels, create virtual environments and fill the wheelhouse from PyPI (pip's
cache makes that quick after the first run), so they carry the ``packaging`` mark, which the
default run leaves out: ``tox -e packaging`` (part of ``make test``) runs them, as does
``pytest -m packaging tests/test_packaging.py``.
"""

from __future__ import annotations

import email.parser
import json
import os
import re
import subprocess
import sys
import textwrap
import venv
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.packaging

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import dists  # noqa: E402  (scripts/dists.py: which distributions the repository has)

PIP = ["-m", "pip", "--disable-pip-version-check", "--no-input"]
URL = "https://github.com/listening-core/listening-core"


def _run(*args: str | Path, cwd: Path = ROOT, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, args))} exited {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}",
            pytrace=False,
        )
    return done.stdout


def _source_version(directory: Path) -> str:
    """The ``__version__`` (or ``VERSION``) the distribution's hatch version source holds."""
    config = dists.tomllib.loads((directory / "pyproject.toml").read_text())
    text = (directory / config["tool"]["hatch"]["version"]["path"]).read_text()
    match = re.search(r"^(?:__version__|VERSION) = \"([^\"]+)\"$", text, re.M)
    assert match, f"no version line in {config['tool']['hatch']['version']['path']}"
    return match.group(1)


@dataclass
class Wheelhouse:
    path: Path
    ours: dict[str, Path]  # distribution name -> its wheel
    core_version: str


def _metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(z.read(name).decode())


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Wheelhouse:
    house = tmp_path_factory.mktemp("wheelhouse")
    _run(sys.executable, ROOT / "scripts" / "dists.py", "wheels", house)
    ours: dict[str, Path] = {}
    for wheel in house.glob("*.whl"):
        ours[_metadata(wheel)["Name"]] = wheel
    assert sorted(ours) == sorted(dists.project_name(d) for d in dists.all_dirs())
    # Pin our own distributions to these wheels, then bring in every third-party wheel they need
    # (from PyPI or pip's cache) so that installs below can run with --no-index.
    pins = house / "constraints.txt"
    pins.write_text("".join(f"{name}=={_metadata(w)['Version']}\n" for name, w in ours.items()))
    _run(
        sys.executable,
        *PIP,
        "wheel",
        "-q",
        "--only-binary=:all:",
        "--wheel-dir",
        house,
        "--find-links",
        house,
        "-c",
        pins,
        "listening-core[all,report]",
        "listening-sink-speech-log",
    )
    return Wheelhouse(house, ours, _metadata(ours["listening-core"])["Version"])


@pytest.fixture
def fresh_venv(tmp_path: Path) -> Iterator[Path]:
    """A new virtual environment with only pip in it; yields its bin directory."""
    venv.EnvBuilder(with_pip=True).create(tmp_path / "venv")
    yield tmp_path / "venv" / "bin"


def _install(bin_dir: Path, house: Wheelhouse, *requirements: str) -> None:
    _run(bin_dir / "python", *PIP, "install", "-q", "--no-index", "--find-links", house.path, *requirements)


def test_every_distribution_passes_twine_check_and_check_wheel_contents(wheelhouse: Wheelhouse) -> None:
    ours = sorted(wheelhouse.ours.values())
    out = _run(sys.executable, "-m", "twine", "check", "--strict", *ours)
    assert out.count("PASSED") == len(ours)
    _run(sys.executable, "-m", "check_wheel_contents", *ours)


@pytest.mark.parametrize("directory", dists.all_dirs(), ids=lambda d: d.name if d != ROOT else "core")
def test_every_wheel_has_its_metadata_licence_and_version(wheelhouse: Wheelhouse, directory: Path) -> None:
    name = dists.project_name(directory)
    wheel = wheelhouse.ours[name]
    meta = _metadata(wheel)
    # one version source: the wheel's version is the package's own __version__
    assert meta["Version"] == _source_version(directory)
    assert meta["License-Expression"] == "MIT"
    with zipfile.ZipFile(wheel) as z:
        licence = [n for n in z.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
        assert licence and z.read(licence[0]).decode().startswith("MIT License")
        packages = dists.wheel_packages(directory)
        assert all(f"{p}/py.typed" in z.namelist() for p in packages)
    classifiers = meta.get_all("Classifier") or []
    assert "Typing :: Typed" in classifiers
    assert {"3.11", "3.12", "3.13"} <= {c.rsplit(" ", 1)[1] for c in classifiers if "Python :: 3." in c}
    assert meta["Author"] and meta["Requires-Python"] == ">=3.11"
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL") or [])
    assert urls["Homepage"] == URL and urls["Issues"] == f"{URL}/issues" and urls["Source"].startswith(URL)
    # the long description PyPI shows has no repository-relative links (dead there)
    assert not re.search(r"\]\((?!https?://|#)[^)]*\)", meta.get_payload()) or directory == ROOT
    if directory != ROOT:
        core = [r for r in meta.get_all("Requires-Dist") or [] if r.startswith("listening-core")]
        major, minor = (int(x) for x in wheelhouse.core_version.split(".")[:2])
        assert core == [f"listening-core<{major}.{minor + 1},>={wheelhouse.core_version}"]


def _sinks(directory: Path) -> list[str]:
    """The sink names a distribution's entry points declare."""
    config = dists.tomllib.loads((directory / "pyproject.toml").read_text())
    return list(config["project"]["entry-points"]["listening_core.sinks"])


def test_the_all_extra_is_every_plugin(wheelhouse: Wheelhouse) -> None:
    meta = _metadata(wheelhouse.ours["listening-core"])
    in_all = {
        r.split(">")[0].split("<")[0] for r in meta.get_all("Requires-Dist") or [] if "extra == 'all'" in r
    }
    plugins = {dists.project_name(d) for d in dists.plugin_dirs() if d.parent.name == "plugins"}
    assert in_all == plugins


RECORD = textwrap.dedent(
    """
    import asyncio, json, sys
    import soundfile
    from listening_core.testing import LocalDiscord, Schedule, record

    async def main(out):
        async with LocalDiscord() as local:
            rec = await record(local, "wav", options={"directory": out},
                               schedules={"alice": Schedule.from_clips([("alice", 0.0)])}, timeout=60)
        spoken = rec.schedules["alice"].duration
        files = {p: soundfile.info(p).duration for p in __import__("glob").glob(out + "/*.wav")}
        print(json.dumps({"errors": [repr(e) for _, e in rec.calls], "spoken": spoken, "files": files}))

    asyncio.run(main(sys.argv[1]))
    """
)


def test_core_with_every_sink_installs_from_the_wheelhouse_alone_and_records(
    wheelhouse: Wheelhouse, fresh_venv: Path, tmp_path: Path
) -> None:
    _install(fresh_venv, wheelhouse, "listening-core[all]")
    env = {**os.environ, "PATH": f"{fresh_venv}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PYTHONPATH", None)
    doctor = _run(fresh_venv / "listening", "doctor", env=env, cwd=tmp_path)
    assert re.search(r"^all \d+ checks ok", doctor, re.M), doctor
    version = re.escape(wheelhouse.core_version)
    flat = re.sub(r"\n +", "", doctor)  # doctor wraps long lines with an indent
    installed = rf"{re.escape(str(fresh_venv.parent))}/.*/site-packages/listening_core"
    assert re.search(rf"^listening-core +ok +{version} \({installed}\)$", flat, re.M), doctor
    listed = json.loads(_run(fresh_venv / "listening", "plugins", "--json", env=env, cwd=tmp_path))
    names = {sink["name"] for sink in listed["sinks"]}
    assert names == {name for d in dists.plugin_dirs() if d.parent.name == "plugins" for name in _sinks(d)}
    script = tmp_path / "record.py"
    script.write_text(RECORD)
    out = tmp_path / "out"
    got = json.loads(_run(fresh_venv / "python", script, out, env=env, cwd=tmp_path).splitlines()[-1])
    assert got["errors"] == ["None"]
    assert len(got["files"]) == 1  # alice's WAV, as long as what she said (give or take the tail)
    (duration,) = got["files"].values()
    assert got["spoken"] - 0.1 <= duration <= got["spoken"] + 2.0


def test_one_plugin_pulls_a_compatible_core(wheelhouse: Wheelhouse, fresh_venv: Path) -> None:
    _install(fresh_venv, wheelhouse, "listening-sink-mp3")
    show = _run(fresh_venv / "python", *PIP, "show", "listening-core")
    assert f"Version: {wheelhouse.core_version}" in show
    env = {**os.environ}
    env.pop("PYTHONPATH", None)
    listed = _run(fresh_venv / "listening", "plugins", env=env)
    assert "mp3" in listed and "wav" not in listed.split()
