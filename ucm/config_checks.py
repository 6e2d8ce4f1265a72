"""How ucm's config values are checked: typed readers that fail with the key's path.

Each reader (:func:`as_int`, :func:`as_float`, :func:`as_str`, :func:`as_seq`) raises a
:class:`UcmConfigError` naming the key; :func:`under` prefixes the path of an error raised
inside a section, so a nested mistake reads ``ucm_sparse_config.Blend.compute_meta[0]...``.
:class:`Section` maps a dict onto a frozen dataclass whose fields are its keys. The typed
sections themselves live in :mod:`ucm.config`.
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import MISSING, fields
from typing import Any, Optional


class UcmConfigError(ValueError):
    """A user's config mistake; the message starts with the key path: the one line seen at start-up."""
    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"{key}: {reason}" if key else reason)

    def __reduce__(self) -> tuple[Any, ...]:  # vLLM may pickle it across processes
        return (self.__class__, (self.key, self.reason))


@contextmanager
def under(prefix: str) -> Iterator[None]:
    """Prefix the key path of a config error raised inside: ``a`` + ``b`` -> ``a.b``, + ``[0]`` -> ``a[0]``."""
    try:
        yield
    except UcmConfigError as err:
        key = prefix if not err.key else f"{prefix}{'' if err.key.startswith('[') else '.'}{err.key}"
        raise UcmConfigError(key, err.reason) from None


def expect(key: str, value: Any, types: Any, name: str) -> Any:
    """Type check; a bool never passes as int or float (``True`` as a token id is a mistake)."""
    if isinstance(value, bool) is not (name == "bool") or not isinstance(value, types):
        raise UcmConfigError(key, f"expected {name}, got {type(value).__name__}")
    return value


def suggest(word: Any, options: Any) -> str:
    """A "did you mean" tail with the closest allowed name: typos are the usual mistake."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_keys(data: Mapping[Any, Any], allowed: Any, what: str = "key") -> None:
    for key in data:
        if key not in allowed:
            listed = ", ".join(allowed)
            raise UcmConfigError(str(key), f"unknown {what}; allowed: {listed}{suggest(key, allowed)}")


def as_int(key: str, value: Any, lo: int, hi: Optional[int] = None) -> int:
    expect(key, value, numbers.Integral, "int")
    if value < lo or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise UcmConfigError(key, f"must be {bounds}, got {value}")
    return int(value)


def as_float(key: str, value: Any, lo: float, hi: float) -> float:
    """An int is fine where a float is expected (``ratio: 1``)."""
    if not lo <= expect(key, value, numbers.Real, "float") <= hi:  # also rejects NaN
        raise UcmConfigError(key, f"must be between {lo} and {hi}, got {value}")
    return float(value)


def as_str(key: str, value: Any, choices: tuple[str, ...] = ()) -> str:
    """A non-empty string; one of ``choices`` when those are given."""
    if not expect(key, value, str, "str"):
        raise UcmConfigError(key, "must be a non-empty string")
    if choices and value not in choices:
        raise UcmConfigError(key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def as_seq(key: str, value: Any, what: str) -> tuple[Any, ...]:
    """A non-empty list or tuple, returned as a tuple so frozen configs stay hashable."""
    if not expect(key, value, (list, tuple), f"a list of {what}"):
        raise UcmConfigError(key, f"needs at least one {what}")
    return tuple(value)


def set_field(obj: Any, name: str, value: Any) -> None:
    """Store a normalized value (list -> tuple, 1 -> 1.0) on a frozen dataclass."""
    object.__setattr__(obj, name, value)


class Section:
    """Dict <-> dataclass where keys are the field names: a new store is such a frozen
    dataclass validating in ``__post_init__``, plus an entry in :data:`STORE_CONFIGS`."""

    @classmethod
    def from_dict(cls, data: Any) -> Any:
        data = expect("", data, Mapping, "a mapping")
        check_keys(data, tuple(f.name for f in fields(cls)))  # type: ignore[arg-type]
        for f in fields(cls):  # type: ignore[arg-type]
            if f.default is MISSING and f.default_factory is MISSING and f.name not in data:
                raise UcmConfigError(f.name, "required key is missing")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict; unset optional values are left out."""
        items = ((f.name, getattr(self, f.name)) for f in fields(self))  # type: ignore[arg-type]
        return {k: v for k, v in items if v is not None}
