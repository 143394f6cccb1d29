"""Method registry: name -> Method class (like timm's model registry)."""
from __future__ import annotations

from zsadcli.core.methods.base import Method, MethodOutput, TrainRecipe
from zsadcli.errors import BadInput

METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    _load_builtin()
    try:
        return METHODS[name]
    except KeyError:
        raise BadInput(f"unknown method {name!r}.", hint=f"available: {', '.join(sorted(METHODS))}") from None


def available_methods() -> dict[str, type[Method]]:
    _load_builtin()
    return dict(METHODS)


def _load_builtin() -> None:
    """Import every method module of this package (importing registers it); lazy so that
    `zsad --help` stays fast. A new method is a new file here, nothing else to edit."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


__all__ = ["METHODS", "Method", "MethodOutput", "TrainRecipe", "available_methods", "get_method", "register_method"]
