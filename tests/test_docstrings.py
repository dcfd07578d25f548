"""Every public name of listening-core has a docstring.

For every module of ``listening_core`` (``listening_core.testing`` included): the module itself,
and each public name *defined in that module* (the names in ``__all__`` when the module has one,
else the names not starting with ``_``) that is a class or a function, plus the public methods,
class methods, static methods and properties that each such class defines itself. Each must
have a non-empty docstring of its own.

Not checked: dunder methods; re-exports (a name defined in another module is checked there;
lazy re-exports through a module ``__getattr__`` are not imported here); constants and type
aliases (their documentation is an attribute docstring, which Python does not keep); members
a class inherits without redefining them (from discord.py, multiprocessing, ``Exception``...).
A method that overrides a documented method of a base class, without changing its contract,
counts as documented: it inherits the base's docstring, as :func:`inspect.getdoc`, ``help()``
and Sphinx show it.

``__main__`` modules are not imported (that would run the command): their module docstring is
read from the source.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import inspect
import pkgutil
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

import listening_core

PACKAGE = "listening_core"


def _module_names() -> list[str]:
    names = [PACKAGE]
    for info in pkgutil.walk_packages(listening_core.__path__, prefix=f"{PACKAGE}."):
        names.append(info.name)
    return sorted(names)


MODULES = _module_names()
IMPORTABLE = [name for name in MODULES if name.rsplit(".", 1)[-1] != "__main__"]


def _own_doc(obj: object) -> str:
    """``obj``'s own docstring, ignoring the one :mod:`dataclasses` makes up from the signature."""
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    if not isinstance(doc, str):
        return ""
    if isinstance(obj, type) and dataclasses.is_dataclass(obj):
        try:
            generated = obj.__name__ + str(inspect.signature(obj)).replace(" -> None", "")
        except (TypeError, ValueError):
            generated = obj.__name__
        if doc == generated:
            return ""
    return doc.strip()


def _public_names(module: types.ModuleType) -> list[str]:
    declared = getattr(module, "__all__", None)
    if declared is not None:
        return list(declared)
    return [name for name in vars(module) if not name.startswith("_")]


def _defined_in(obj: object, module: types.ModuleType) -> bool:
    target = inspect.unwrap(obj) if callable(obj) else obj  # functools.cache, wraps...
    return getattr(target, "__module__", None) == module.__name__


def _is_function(obj: object) -> bool:
    return inspect.isfunction(inspect.unwrap(obj)) if callable(obj) else False


def _members(cls: type) -> Iterator[tuple[str, object]]:
    """The public methods and properties ``cls`` defines itself (not inherited, not dunder)."""
    for name, raw in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(raw, staticmethod | classmethod):
            yield name, raw.__func__
        elif isinstance(raw, property | functools.cached_property) or _is_function(raw):
            yield name, raw


def _member_doc(cls: type, name: str, member: object) -> str:
    own = _own_doc(member)
    if own:
        return own
    # an override of a documented base-class member inherits its docstring (inspect.getdoc)
    for base in cls.__mro__[1:]:
        if name in vars(base):
            inherited = vars(base)[name]
            if isinstance(inherited, staticmethod | classmethod):
                inherited = inherited.__func__
            doc = getattr(inherited, "__doc__", None)
            if isinstance(doc, str) and doc.strip():
                return doc.strip()
    return ""


def undocumented(module: types.ModuleType) -> list[str]:
    """The names in ``module`` that need a docstring and have none, as ``module.Name.member``."""
    missing: list[str] = []
    if not _own_doc(module):
        missing.append(f"{module.__name__} (module docstring)")
    lazy = hasattr(module, "__getattr__")
    for name in _public_names(module):
        if name not in vars(module):
            if lazy:
                continue  # a lazy re-export: checked in the module that defines it
            missing.append(f"{module.__name__}.{name} (listed in __all__ but not defined)")
            continue
        obj = vars(module)[name]
        if not _defined_in(obj, module):
            continue
        if isinstance(obj, type):
            if not _own_doc(obj):
                missing.append(f"{module.__name__}.{name}")
            for member_name, member in _members(obj):
                if not _member_doc(obj, member_name, member):
                    missing.append(f"{module.__name__}.{name}.{member_name}")
        elif _is_function(obj) and not _own_doc(obj):
            missing.append(f"{module.__name__}.{name}")
    return missing


# ------------------------------------------------------------------------------------- tests


def test_every_module_is_found() -> None:
    here = Path(listening_core.__file__).parent
    expected = {f"{PACKAGE}.{path.stem}" for path in here.glob("*.py") if path.stem != "__init__"}
    assert expected <= set(MODULES)
    assert f"{PACKAGE}.testing" in MODULES and f"{PACKAGE}.testing.server" in MODULES


@pytest.mark.parametrize("name", IMPORTABLE)
def test_public_names_have_docstrings(name: str) -> None:
    module = importlib.import_module(name)
    missing = undocumented(module)
    assert not missing, "public names without a docstring:\n  " + "\n  ".join(missing)


@pytest.mark.parametrize("name", [name for name in MODULES if name not in IMPORTABLE])
def test_main_module_has_a_docstring(name: str) -> None:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    assert (ast.get_docstring(tree) or "").strip(), f"{name} has no module docstring"


# --------------------------------------------------------------------- the checker checks


class _Documented:
    """A class with a docstring."""

    def method(self) -> None:
        """A method with one."""

    @property
    def prop(self) -> int:
        """A property with one."""
        return 1


class _Bare:
    def method(self) -> None:
        pass

    @property
    def prop(self) -> int:
        return 1

    @staticmethod
    def static() -> None:
        pass

    @classmethod
    def klass(cls) -> None:
        pass

    def _private(self) -> None:
        pass

    def __repr__(self) -> str:
        return "bare"


class _Override(_Documented):
    """Overrides without docstrings inherit the base's."""

    def method(self) -> None:
        pass


@dataclasses.dataclass
class _BareData:
    x: int = 0


def _fake_module(**names: object) -> types.ModuleType:
    module = types.ModuleType("fake_module", "A module docstring.")
    for name, obj in names.items():
        if callable(obj):
            inspect.unwrap(obj).__module__ = "fake_module"
        setattr(module, name, obj)
    return module


def test_checker_finds_what_is_missing() -> None:
    @functools.cache
    def cached() -> None:
        pass

    def bare() -> None:
        pass

    module = _fake_module(
        Documented=_Documented, Bare=_Bare, Override=_Override, BareData=_BareData, cached=cached, bare=bare
    )
    module.__all__ = ["Documented", "Bare", "Override", "BareData", "cached", "bare", "gone"]  # type: ignore[attr-defined]
    assert sorted(undocumented(module)) == sorted(
        [
            "fake_module.Bare",
            "fake_module.Bare.method",
            "fake_module.Bare.prop",
            "fake_module.Bare.static",
            "fake_module.Bare.klass",
            "fake_module.BareData",
            "fake_module.cached",
            "fake_module.bare",
            "fake_module.gone (listed in __all__ but not defined)",
        ]
    )


def test_checker_skips_reexports_and_private_names() -> None:
    module = _fake_module()
    module.Path = Path  # type: ignore[attr-defined]  # defined elsewhere: checked there
    module._hidden = lambda: None  # type: ignore[attr-defined]
    assert undocumented(module) == []
    module.__doc__ = None
    assert undocumented(module) == ["fake_module (module docstring)"]
