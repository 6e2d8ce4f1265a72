"""Store registry: config names -> classes, and tier chains built from config.

Config files name stores by string ("UcmDramStore", ...), so the mapping lives
in one place and third-party tiers can plug in with :func:`register_store`
without the connector knowing about them. Config objects are accepted as plain
dicts or as any object with matching attributes (the dataclasses in
:mod:`ucm.config`), so this module does not import the config module.

A store's construction error is a config error: :func:`build_store_chain` raises it as
a :class:`UcmConfigError` naming the full key path (``ucm_connectors[i].ucm_connector_config.<key>``),
so what only the store can find out (a root that cannot be created) reads like every
other config mistake. A store that names its config keys in later errors too (the
DRAM budget, checked once the block size is known) takes a ``config_key`` argument.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import threading
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type

from ucm.config_checks import UcmConfigError, under
from ucm.store.base import KVStoreBase, StoreError
from ucm.store.dram_store import UcmDramStore
from ucm.store.nfs_store import UcmNfsStore
from ucm.store.pipeline_store import UcmPipelineStore

logger = logging.getLogger(__name__)

_registry_lock = threading.Lock()
_REGISTRY: Dict[str, Type[KVStoreBase]] = {
    "UcmDramStore": UcmDramStore,
    "UcmNfsStore": UcmNfsStore,
    "UcmPipelineStore": UcmPipelineStore,
}

StoreSpec = Tuple[str, Any]

#: Constructor argument through which the factory tells a store its config's key path.
CONFIG_KEY_PARAM = "config_key"
#: Store name -> the key of where it keeps its data: a StoreError while building such a
#: store is about that place (a root that cannot be created) unless its message names a key.
LOCATION_KEYS: Dict[str, str] = {"UcmNfsStore": "storage_backends"}


def register_store(name: str, cls: Type[KVStoreBase]) -> None:
    """Add a store class under ``name``; re-registering a name is a ValueError.

    Refusing duplicates keeps two plugins from silently replacing each other.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"store name must be a non-empty str, got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, KVStoreBase)):
        raise TypeError(f"store class must subclass KVStoreBase, got {cls!r}")
    with _registry_lock:
        if name in _REGISTRY:
            raise ValueError(f"store {name!r} is already registered ({_REGISTRY[name].__name__})")
        _REGISTRY[name] = cls


def registered_stores() -> List[str]:
    """Known store names, sorted (used in error messages and docs)."""
    with _registry_lock:
        return sorted(_REGISTRY)


def _constructor_params(cls: Type[KVStoreBase]) -> List[str]:
    sig = inspect.signature(cls.__init__)
    return [
        p.name for p in sig.parameters.values()
        if p.name not in ("self", CONFIG_KEY_PARAM) and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def _config_kwargs(name: str, cls: Type[KVStoreBase], config: Any) -> Dict[str, Any]:
    """Turn a dict / dataclass / attribute object into constructor kwargs.

    Dict keys must all be constructor parameters (a typo should fail, not be
    ignored). For objects, only attributes named like parameters are taken,
    since config objects may carry unrelated fields.
    """
    params = _constructor_params(cls)
    if config is None:
        return {}
    if isinstance(config, Mapping):
        unknown = sorted(set(config) - set(params))
        if unknown:
            raise ValueError(f"unknown config keys for {name}: {unknown}; accepted: {params}")
        return dict(config)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        return {k: v for k, v in fields.items() if k in params}
    return {p: getattr(config, p) for p in params if hasattr(config, p)}


def _coerce_tiers(tiers: Sequence[Any]) -> List[KVStoreBase]:
    """Pipeline tiers may be given as stores, (name, config) pairs or {"name", "config"} dicts."""
    out = []
    for tier in tiers:
        if isinstance(tier, KVStoreBase):
            out.append(tier)
        elif isinstance(tier, Mapping):
            out.append(create_store(tier["name"], tier.get("config")))
        else:
            tier_name, tier_config = tier
            out.append(create_store(tier_name, tier_config))
    return out


def create_store(name: str, config: Optional[Any] = None, config_key: Optional[str] = None) -> KVStoreBase:
    """Instantiate the store registered as ``name`` with ``config``.

    Unknown names raise ValueError listing the known ones, so a config typo
    points straight at the fix. ``config_key`` (the key path of ``config``) is passed
    to stores that accept it, for errors they raise after construction.
    """
    with _registry_lock:
        cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"unknown store {name!r}; known stores: {', '.join(registered_stores())}")
    kwargs = _config_kwargs(name, cls, config)
    if issubclass(cls, UcmPipelineStore) and "tiers" in kwargs:
        kwargs["tiers"] = _coerce_tiers(kwargs["tiers"])
    if config_key is not None and CONFIG_KEY_PARAM in inspect.signature(cls.__init__).parameters:
        kwargs[CONFIG_KEY_PARAM] = config_key
    logger.info("creating store %s with %s", name, sorted(kwargs))
    return cls(**kwargs)


def _as_config_error(name: str, exc: Exception) -> UcmConfigError:
    """A store's construction failure as a config error naming the key it is about:
    the store's own key (a UcmConfigError), a constructor argument its message starts
    with (``capacity_bytes must be ...``, ``storage_backends: cannot create ...``), or for
    a StoreError the store's location key (:data:`LOCATION_KEYS`); else the section."""
    if isinstance(exc, UcmConfigError):
        return exc
    text = str(exc)
    with _registry_lock:
        cls = _REGISTRY.get(name)
    for param in _constructor_params(cls) if cls is not None else ():
        if text.startswith(f"{param}: "):
            return UcmConfigError(param, f"{name}: {text[len(param) + 2:]}")
        if text.startswith(f"{param} "):
            return UcmConfigError(param, f"{name}: {text}")
    location = LOCATION_KEYS.get(name) if isinstance(exc, StoreError) else None
    return UcmConfigError(location or "", f"{name}: {text}")


def build_store_chain(specs: Sequence[StoreSpec], key: str = "ucm_connectors") -> KVStoreBase:
    """Build tiers from ``[(name, config), ...]`` (fastest first).

    One spec yields that store itself (no pipeline overhead); several yield a
    :class:`UcmPipelineStore` over them in the given order. If a later tier
    fails to build, the ones already built are closed before re-raising. A tier's
    construction error is raised as a :class:`UcmConfigError` under
    ``<key>[i].ucm_connector_config`` (``key``: where the specs came from in the config).
    """
    if not specs:
        raise ValueError("build_store_chain needs at least one (name, config) spec")
    stores: List[KVStoreBase] = []
    try:
        for i, (name, config) in enumerate(specs):
            section = f"{key}[{i}].ucm_connector_config"
            with under(section):
                try:
                    stores.append(create_store(name, config, config_key=section))
                except (ValueError, TypeError, OSError, StoreError) as exc:
                    raise _as_config_error(name, exc) from exc
    except BaseException:
        for store in stores:
            store.close()
        raise
    if len(stores) == 1:
        return stores[0]
    return UcmPipelineStore(stores)
