"""How a method package finds its methods (core.compressors, core.curvatures): every subclass of
the package's base class that has a `name`, defined in any module of the package. Modules are
imported in name order and classes kept in the order each module defines them, so adding a method
is adding one module."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Iterable, TypeVar

T = TypeVar("T", bound=type)


def discover(package: str, path: Iterable[str], base: T, key: str) -> dict[str, T]:
    """{name: class} of the package at `path`; `key` (the job-file key, e.g. "hessian.method")
    names a method defined twice."""
    found: dict[str, T] = {}
    for info in pkgutil.iter_modules(path):
        module = importlib.import_module(f"{package}.{info.name}")
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, base) and "name" in vars(value)
                    and value.__module__ == module.__name__):
                if value.name in found:
                    raise ValueError(f"{key} {value.name!r} is defined twice: {found[value.name]} and {value}")
                found[value.name] = value
    return found
