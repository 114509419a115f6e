"""dq's quantizer registered with diffusers without `import dq` importing diffusers (or torch);
`when_imported(module, callback)` is the mechanism (dq.onload uses it for transformers too).

diffusers finds quantizers in the module-level dicts of `diffusers.quantizers.auto`
(`dq.serialization.register` adds dq's entries there). `install()` runs on `import dq`:

- if that module is already imported, dq registers at once (diffusers, and so torch, are
  loaded already: nothing is added to the import cost);
- otherwise a finder on `sys.meta_path` waits for it: when anything imports it (diffusers
  does on the first model or pipeline load), the module runs as usual and dq registers right
  after, before the importer sees it, then the finder removes itself.

A registration that fails (a broken install) warns with the cause instead of breaking
diffusers' import for every other quantizer.
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

TARGET = "diffusers.quantizers.auto"


def _register() -> None:
    mod = sys.modules.get("dq.serialization")
    if mod is not None and getattr(mod.__spec__, "_initializing", False):
        return  # dq.serialization is the importer: it registers itself when its import ends
    try:
        from dq import serialization

        serialization.register()
    except Exception as e:  # pragma: no cover - only on a broken install
        warnings.warn(
            f"dq could not register its quantizer with diffusers ({type(e).__name__}: {e}); "
            "dq-quantized folders will not load until this is fixed (reinstall dq)",
            stacklevel=2,
        )


class _Loader(importlib.abc.Loader):
    """The real loader of a module, then a callback."""

    def __init__(self, inner: importlib.abc.Loader, then: Callable[[], None]) -> None:
        self._inner, self._then = inner, then

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self._inner  # tools that read sources see the real loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._inner
        self._inner.exec_module(module)
        self._then()

    def __getattr__(self, name: str) -> Any:  # get_source, get_resource_reader, ...
        return getattr(self._inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    """One-shot: when `target` is imported, it runs as usual, then `then()` runs."""

    def __init__(self, target: str, then: Callable[[], None]) -> None:
        self.target, self.then = target, then

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.target:
            return None
        _remove(self.target)  # one shot: the next import of anything is untouched
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader, self.then)
                return spec
        return None


def _remove(target: str) -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not (isinstance(f, _Finder) and f.target == target)]


def installed(target: str = TARGET) -> bool:
    """Whether a callback still waits for `target` (default: diffusers' registry) to be imported."""
    return any(isinstance(f, _Finder) and f.target == target for f in sys.meta_path)


def uninstall(target: str = TARGET) -> None:
    _remove(target)


def when_imported(target: str, then: Callable[[], None]) -> None:
    """Run `then()` now if module `target` is imported, else right after it is (idempotent per
    target: a second call while one waits adds nothing)."""
    module = sys.modules.get(target)
    if module is not None and not getattr(module.__spec__, "_initializing", False):
        then()
    elif not installed(target):
        sys.meta_path.insert(0, _Finder(target, then))


def install() -> None:
    """Register dq with diffusers now if its registry is loaded, else when it is."""
    when_imported(TARGET, _register)
