"""A module imported on first use, for the few dq modules that the command line needs without
torch (`dq presets` reads the presets through `dq.config` -> `dq.formats`)."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class _Deferred(ModuleType):
    def __init__(self, name: str, namespace: dict[str, Any], alias: str) -> None:
        super().__init__(name)
        self._namespace, self._alias = namespace, alias

    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self.__name__)
        self._namespace[self._alias] = module  # the module's global now names the real one
        return getattr(module, attr)


def deferred_import(name: str, namespace: dict[str, Any], alias: str | None = None) -> Any:
    """A stand-in for `import name` (as `alias`) in the module whose `globals()` is
    `namespace`: the first attribute read imports the real module and rebinds the global, so
    every later use in that module is the plain module (no proxy left).

        torch = deferred_import("torch", globals())
    """
    return _Deferred(name, namespace, alias or name.rpartition(".")[2])
