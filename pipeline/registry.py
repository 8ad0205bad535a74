"""Name -> class registries (extractors, methods), filled by importing every public module of a
package on first use: adding an entry is adding one file."""

from __future__ import annotations

import importlib
import pkgutil


class Registry:
    def __init__(self, kind: str, package: str, skip: tuple[str, ...] = ()):
        self.classes: dict[str, type] = {}
        self.kind, self.package, self.skip = kind, package, skip
        self._discovered = False

    def register(self, cls):
        if self.classes.get(cls.name, cls) is not cls:
            raise ValueError(f"{self.kind} name {cls.name!r} registered twice")
        self.classes[cls.name] = cls
        return cls

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        pkg = importlib.import_module(self.package)
        for m in pkgutil.iter_modules(pkg.__path__):
            if not m.name.startswith("_") and m.name not in self.skip:
                importlib.import_module(f"{self.package}.{m.name}")

    def available(self) -> dict:
        self._discover()
        return dict(sorted(self.classes.items()))

    def get(self, name: str):
        reg = self.available()
        if name not in reg:
            raise KeyError(f"unknown {self.kind} {name!r}; available: {', '.join(reg)}")
        return reg[name]
