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
    # Importing the modules registers them; kept lazy so `zsad --help` stays fast.
    from zsadcli.core.methods import anomalyclip  # noqa: F401


__all__ = ["METHODS", "Method", "MethodOutput", "TrainRecipe", "available_methods", "get_method", "register_method"]
