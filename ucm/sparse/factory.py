"""Name -> sparse method class, imported lazily so unused methods cost nothing."""

from __future__ import annotations

import importlib
from typing import Type

from ucm.sparse.base import UcmSparseBase

_REGISTRY: dict[str, tuple[str, str]] = {}


def register_sparse_method(name: str, module_path: str, class_name: str) -> None:
    """Register ``name`` as ``module_path.class_name``; a second registration fails."""
    if name in _REGISTRY:
        raise ValueError(f"sparse method {name!r} is already registered as {_REGISTRY[name]}")
    _REGISTRY[name] = (module_path, class_name)


def known_sparse_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_sparse_method_class(name: str) -> Type[UcmSparseBase]:
    """Import and return the class registered under ``name``."""
    try:
        module_path, class_name = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown sparse method {name!r}; known methods: {', '.join(known_sparse_methods())}"
        ) from None
    cls = getattr(importlib.import_module(module_path), class_name)
    if not (isinstance(cls, type) and issubclass(cls, UcmSparseBase)):
        raise TypeError(f"{module_path}.{class_name} is not a UcmSparseBase subclass")
    return cls


def create_sparse_method(name: str, config: object, role: str) -> UcmSparseBase:
    return get_sparse_method_class(name)(config, role)


register_sparse_method("Blend", "ucm.sparse.blend.blend", "Blend")
register_sparse_method("EPIC", "ucm.sparse.epic.epic", "Epic")
