"""One typed, validated model of everything a user sets for ucm.

Sources: vLLM's ``kv_connector_extra_config`` dict or the same content as YAML in
``UCM_CONFIG_FILE``, plus the env switch ``ENABLE_SPARSE``. All is checked once, at
engine start, so a bad key, type or value fails with a message that starts with its
full key path, never later inside a forward pass. Errors carry a path relative to
the section that raised them and each enclosing parser prefixes its key
(:func:`under`): dataclasses validate themselves in ``__post_init__`` (direct
construction is checked too) and parsed input still gets full paths.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

import yaml

from ucm.config_checks import (Section, UcmConfigError, as_float, as_int, as_seq, as_str, check_keys, expect,
                               set_field, suggest, under)
from ucm.config_chunks import SHARED_KEYS, check_chunk_settings, check_chunk_tokens, shared_to_dict
from ucm.config_epic import MAX_RECOMPUTE_TOKENS, EpicConfig

# Blend's ranking of reused tokens at a check layer ("boundary": each reused chunk's first
# ``boundary_tokens`` tokens, then deviation, within the same budget).
SELECTIONS = ("deviation", "query", "mixed", "boundary")

logger = logging.getLogger(__name__)

GiB = 1 << 30
CONFIG_FILE_ENV = "UCM_CONFIG_FILE"
ENABLE_SPARSE_ENV = "ENABLE_SPARSE"
EXTRA_CONFIG_KEY = "kv_connector_extra_config"
_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class DramStoreConfig(Section):
    """Host-memory LRU tier; the budget bounds how much RAM the cache may pin. None: the
    store's default (4 GiB), fitted to the host's available memory at start."""
    capacity_bytes: Optional[int] = None

    def __post_init__(self) -> None:
        if self.capacity_bytes is not None:
            set_field(self, "capacity_bytes", as_int("capacity_bytes", self.capacity_bytes, lo=1))


@dataclass(frozen=True)
class NfsStoreConfig(Section):
    """One file per block under ``storage_backends`` (a local dir or an NFS mount); the
    store, not the config, creates it: a config may be checked where the mount is absent."""
    storage_backends: str
    capacity_bytes: Optional[int] = None  # None: no limit, no eviction
    io_threads: int = 4
    pinned_read_bytes: int = 4 << 30  # page-locked read buffers at most (0: never pin)

    def __post_init__(self) -> None:
        path = self.storage_backends
        path = os.fspath(path) if isinstance(path, os.PathLike) else path  # pathlib.Path is fine
        set_field(self, "storage_backends", as_str("storage_backends", path))
        if not path.strip():  # "  " would become a directory of that name in the engine's cwd
            raise UcmConfigError("storage_backends", f"must be a non-empty string (a directory), got {path!r}")
        if self.capacity_bytes is not None:
            set_field(self, "capacity_bytes", as_int("capacity_bytes", self.capacity_bytes, lo=1))
        set_field(self, "io_threads", as_int("io_threads", self.io_threads, lo=1, hi=64))
        set_field(self, "pinned_read_bytes", as_int("pinned_read_bytes", self.pinned_read_bytes, lo=0))


StoreConfig = Union[DramStoreConfig, NfsStoreConfig]

#: Store name (``ucm_connector_name``) -> its config class. Add new stores here.
STORE_CONFIGS: dict[str, type] = {"UcmDramStore": DramStoreConfig, "UcmNfsStore": NfsStoreConfig}


@dataclass(frozen=True)
class StoreSpec:
    """One tier of the store pipeline: which store, and its own config."""
    name: str
    config: StoreConfig

    def __post_init__(self) -> None:
        key = "ucm_connector_name"
        if expect(key, self.name, str, "str") not in STORE_CONFIGS:
            known = ", ".join(STORE_CONFIGS) + suggest(self.name, STORE_CONFIGS)
            raise UcmConfigError(key, f"unknown store {self.name!r}; known: {known}")
        expected = STORE_CONFIGS[self.name]
        expect("ucm_connector_config", self.config, expected, expected.__name__)

    @classmethod
    def from_dict(cls, data: Any) -> StoreSpec:
        data = expect("", data, Mapping, "a mapping")
        check_keys(data, ("ucm_connector_name", "ucm_connector_config"))
        if "ucm_connector_name" not in data:
            raise UcmConfigError("ucm_connector_name", f"required key is missing; known: {', '.join(STORE_CONFIGS)}")
        name = data["ucm_connector_name"]
        if not isinstance(name, str) or name not in STORE_CONFIGS:
            return cls(name, None)  # type: ignore[arg-type]  # raises the name error
        with under("ucm_connector_config"):
            return cls(name, STORE_CONFIGS[name].from_dict(data.get("ucm_connector_config", {})))

    def to_dict(self) -> dict[str, Any]:
        return {"ucm_connector_name": self.name, "ucm_connector_config": self.config.to_dict()}


LAYER_NAME_FORM = "model.layers.<N>.self_attn.attn"
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.self_attn\.attn")


@dataclass(frozen=True)
class CheckLayer:
    """A layer where Blend measures KV deviation and keeps the top ``ratio`` of reused tokens."""
    layer_index: int
    layer_name: str
    ratio: float

    def __post_init__(self) -> None:
        set_field(self, "layer_index", as_int("layer_index", self.layer_index, lo=0))
        match = _LAYER_RE.fullmatch(as_str("layer_name", self.layer_name))
        if match is None:
            raise UcmConfigError("layer_name", f"expected the form {LAYER_NAME_FORM}, got {self.layer_name!r}")
        if int(match.group(1)) != self.layer_index:
            raise UcmConfigError("layer_index", f"{self.layer_index} does not match {self.layer_name!r}")
        set_field(self, "ratio", as_float("ratio", self.ratio, 0.0, 1.0))

    @classmethod
    def from_compute_meta(cls, layer_name: Any, meta: Any) -> CheckLayer:
        """Parse one ``compute_meta`` entry (layer name -> ``{"ratio": r}``)."""
        with under(str(layer_name)):
            match = _LAYER_RE.fullmatch(layer_name) if isinstance(layer_name, str) else None
            if match is None:
                raise UcmConfigError("", f"not a layer name of the form {LAYER_NAME_FORM} (vLLM's attention layer)")
            meta = expect("", meta, Mapping, "a mapping")
            check_keys(meta, ("ratio",))
            if "ratio" not in meta:
                raise UcmConfigError("ratio", "required key is missing (share of reused tokens to recompute, 0..1)")
            return cls(int(match.group(1)), layer_name, meta["ratio"])


@dataclass(frozen=True)
class BlendConfig:
    """Settings of the Blend (CacheBlend) sparse method. Exactly one chunk delimiter must be
    set: guessed chunk boundaries would silently make every chunk key miss."""
    chunk_end_token_id: Optional[int] = None  # a chunk ends with this token
    blend_special_str: Optional[str] = None  # separator text, tokenized once by the integration
    separator_token_ids: Optional[tuple[int, ...]] = None  # separator as token ids
    check_layers: tuple[CheckLayer, ...] = (CheckLayer(1, "model.layers.1.self_attn.attn", 0.15),)  # by index
    deviation_target: str = "k"  # cache the deviation is measured on: "k", "v" or "kv"
    deviation_norm: str = "l2"  # "l1" or "l2" per token, summed over heads
    save_chunks: bool = True  # store each missed chunk's KV under its chunk keys for later requests
    min_chunk_tokens: int = 1  # shorter chunks are recomputed, not reused
    pay_policy: str = "auto"  # "auto": blend a request only where it measured faster; "always": blend every one
    selection: str = "deviation"  # how a check layer ranks reused tokens: one of SELECTIONS
    boundary_tokens: int = 16  # "boundary" selection: first tokens of each reused chunk always recomputed

    def __post_init__(self) -> None:
        check_chunk_settings(self)
        self._check_layers()
        as_str("deviation_target", self.deviation_target, ("k", "v", "kv"))
        as_str("deviation_norm", self.deviation_norm, ("l1", "l2"))
        as_str("selection", self.selection, SELECTIONS)
        set_field(self, "boundary_tokens", as_int("boundary_tokens", self.boundary_tokens, 0, MAX_RECOMPUTE_TOKENS))

    def _check_layers(self) -> None:
        """Sort by layer index and enforce gradual filtering: ratios never rise with depth."""
        layers = tuple(sorted(as_seq("compute_meta", self.check_layers, "check layer"), key=lambda c: c.layer_index))
        for prev, cur in zip(layers, layers[1:]):
            if prev.layer_index == cur.layer_index:
                raise UcmConfigError("compute_meta", f"layer {cur.layer_index} is given twice")
            if cur.ratio > prev.ratio:
                raise UcmConfigError("compute_meta", (
                    f"ratios must not increase with the layer index (gradual filtering); layer "
                    f"{prev.layer_index} has {prev.ratio} but layer {cur.layer_index} has {cur.ratio}"))
        set_field(self, "check_layers", layers)

    def check_model(self, num_layers: int, vocab_size: Optional[int], has_tokenizer: bool) -> None:
        """Refuse settings this model cannot honour; they would run and silently do nothing
        (a check layer never reached recomputes every token, a token id outside the
        vocabulary never ends a chunk). Keys are relative to the Blend section."""
        for check in self.check_layers:
            if not 0 <= check.layer_index < num_layers:
                raise UcmConfigError(f"compute_meta.{check.layer_name}", (
                    f"not an attention layer of this model: it has {num_layers} layers, so a check layer "
                    f"index must be in [0, {num_layers}) ({LAYER_NAME_FORM.replace('<N>', '0')} .. "
                    f"{LAYER_NAME_FORM.replace('<N>', str(num_layers - 1))})"))
        check_chunk_tokens(self, vocab_size, has_tokenizer)

    @property
    def final_ratio(self) -> float:
        """The share of reused rows recomputed after the last check layer."""
        return self.check_layers[-1].ratio

    @property
    def first_check_layer(self) -> int:
        """Index of the first check layer; every layer before it is computed in full."""
        return self.check_layers[0].layer_index

    @property
    def first_reused_layer(self) -> int:
        """The first layer where loaded chunk KV replaces computed KV (chunk loads fill it
        and every later layer): Blend's first check layer."""
        return self.first_check_layer

    @classmethod
    def from_dict(cls, data: Any) -> BlendConfig:
        data = expect("", data, Mapping, "a mapping")
        check_keys(data, (*SHARED_KEYS, "compute_meta", "deviation_target", "deviation_norm", "selection",
                          "boundary_tokens"))
        kwargs = {k: v for k, v in data.items() if k != "compute_meta"}
        if "compute_meta" in data:
            with under("compute_meta"):
                meta = expect("", data["compute_meta"], Mapping, "a mapping")
                kwargs["check_layers"] = tuple(CheckLayer.from_compute_meta(k, v) for k, v in meta.items())
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = shared_to_dict(self)
        out["compute_meta"] = {c.layer_name: {"ratio": c.ratio} for c in self.check_layers}
        out.update(deviation_target=self.deviation_target, deviation_norm=self.deviation_norm,
                   selection=self.selection, boundary_tokens=self.boundary_tokens)
        return out


@dataclass(frozen=True)
class EngineOptions(Section):
    """How the engine moves KV and shrinks rows (``engine_options``). The defaults are the
    measured best; benchmarks and tests set others to compare (docs/DECISIONS.md)."""

    defer_chunk_loads: bool = True  # a Blend step's chunk load is issued by its first reader (the check layer)
    load_layer_group: Optional[int] = None  # None: 6 with pitched copies, else -1; -1 whole blocks; 0/k layer groups
    rope_slice_bytes: int = 64 << 20  # device bytes of re-rotated K per slice on the torch load path
    shrink_before_mlp: bool = True  # a check layer drops its unselected rows before its MLP
    save_copies_queued: int = 1  # device -> host save copies queued at a time on CUDA
    eager_kernels: bool = True  # a Blend step runs vLLM's custom ops on their platform kernels (as enforce_eager)

    def __post_init__(self) -> None:
        expect("defer_chunk_loads", self.defer_chunk_loads, bool, "bool")
        if self.load_layer_group is not None:
            as_int("load_layer_group", self.load_layer_group, lo=-1)
        as_int("rope_slice_bytes", self.rope_slice_bytes, lo=1)
        expect("shrink_before_mlp", self.shrink_before_mlp, bool, "bool")
        as_int("save_copies_queued", self.save_copies_queued, lo=1)
        expect("eager_kernels", self.eager_kernels, bool, "bool")


#: Sparse method name (key of ``ucm_sparse_config``) -> (config class, UcmConfig field).
SPARSE_METHODS: dict[str, tuple[type, str]] = {"Blend": (BlendConfig, "blend"), "EPIC": (EpicConfig, "epic")}
ChunkMethodConfig = Union[BlendConfig, EpicConfig]


@dataclass(frozen=True)
class UcmConfig:
    """Everything ucm reads from the user, validated."""
    stores: tuple[StoreSpec, ...] = (StoreSpec("UcmDramStore", DramStoreConfig()),)  # tiers, fastest first
    blend: Optional[BlendConfig] = None
    epic: Optional[EpicConfig] = None
    use_layerwise: bool = True  # load/save KV per layer so that I/O overlaps compute
    log_stats: bool = True
    block_tokens: int = 16  # tokens per stored block (hashing and store granularity)
    engine: EngineOptions = EngineOptions()  # engine_options

    def __post_init__(self) -> None:
        set_field(self, "stores", as_seq("ucm_connectors", self.stores, "store"))
        as_int("block_tokens", self.block_tokens, 1, 4096)
        expect("use_layerwise", self.use_layerwise, bool, "bool")
        if not self.use_layerwise:  # a setting that would silently do nothing is refused
            raise UcmConfigError("use_layerwise", "ucm always loads KV layer-wise (chunk loads in layer groups issued "
                                 "by the first reading layer, prefix loads before the forward); false is not "
                                 "supported: leave the key out or set true")
        expect("log_stats", self.log_stats, bool, "bool")
        named = [name for name, (_, attr) in SPARSE_METHODS.items() if getattr(self, attr) is not None]
        if len(named) > 1:
            raise UcmConfigError("ucm_sparse_config", f"configure one sparse method per engine; got {len(named)}: "
                                                      f"{' and '.join(named)}")

    @property
    def method_name(self) -> Optional[str]:
        """The configured sparse method's registry name ("Blend", "EPIC"), or None."""
        return next((name for name, (_, attr) in SPARSE_METHODS.items() if getattr(self, attr) is not None), None)

    @property
    def chunk_method(self) -> Optional[ChunkMethodConfig]:
        """The configured chunk-reuse method's section (at most one is set), or None."""
        name = self.method_name
        return getattr(self, SPARSE_METHODS[name][1]) if name is not None else None

    @classmethod
    def from_dict(cls, data: Any) -> UcmConfig:
        """Parse the content of ``kv_connector_extra_config`` (or of the YAML file)."""
        data = expect("", data, Mapping, "a mapping")
        check_keys(data, ("ucm_connectors", "ucm_sparse_config", "use_layerwise", "log_stats", "block_tokens",
                          "engine_options"))
        kwargs: dict[str, Any] = {k: data[k] for k in ("use_layerwise", "log_stats", "block_tokens") if k in data}
        if "ucm_connectors" in data:
            with under("ucm_connectors"):
                specs = []
                for i, item in enumerate(as_seq("", data["ucm_connectors"], "store")):
                    with under(f"[{i}]"):
                        specs.append(StoreSpec.from_dict(item))
                kwargs["stores"] = tuple(specs)
        if "engine_options" in data:
            with under("engine_options"):
                kwargs["engine"] = EngineOptions.from_dict(data["engine_options"])
        if "ucm_sparse_config" in data:
            with under("ucm_sparse_config"):
                methods = expect("", data["ucm_sparse_config"], Mapping, "a mapping")
                check_keys(methods, tuple(SPARSE_METHODS), what="sparse method")
                for name, section in methods.items():
                    config_cls, attr = SPARSE_METHODS[name]
                    with under(name):
                        kwargs[attr] = config_cls.from_dict(section)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The extra-config dict that parses back to this object; JSON and YAML safe."""
        out: dict[str, Any] = {"ucm_connectors": [s.to_dict() for s in self.stores]}
        sparse = {name: getattr(self, attr).to_dict() for name, (_, attr) in SPARSE_METHODS.items()
                  if getattr(self, attr) is not None}
        if sparse:
            out["ucm_sparse_config"] = sparse
        out.update(use_layerwise=self.use_layerwise, log_stats=self.log_stats, block_tokens=self.block_tokens,
                   engine_options=self.engine.to_dict())
        return out

    @classmethod
    def from_extra_config(cls, extra: Optional[Mapping[str, Any]], env: Mapping[str, str] = os.environ) -> UcmConfig:
        """From vLLM's extra config or ``UCM_CONFIG_FILE``, never both (which would win?).
        ``ENABLE_SPARSE`` is checked here too, so that a typo in it fails at engine start."""
        if extra is not None:
            expect(EXTRA_CONFIG_KEY, extra, Mapping, "a mapping")
        path = env.get(CONFIG_FILE_ENV, "").strip()
        if path:
            if extra:
                raise UcmConfigError(CONFIG_FILE_ENV, f"set the config in one place: both {CONFIG_FILE_ENV}="
                                                      f"{path!r} and a non-empty {EXTRA_CONFIG_KEY} are given")
            data = _load_yaml(path)
            try:
                config = cls.from_dict(data)
            except UcmConfigError as err:
                raise UcmConfigError(err.key, f"{err.reason} (in {CONFIG_FILE_ENV}={path})") from None
        else:
            config = cls.from_dict(extra or {})
        sparse = sparse_enabled(env)
        name = config.method_name
        if sparse != (name is not None):
            logger.warning("%s is %s but ucm_sparse_config %s", ENABLE_SPARSE_ENV, "on" if sparse else "off",
                           "names no method" if sparse else f"sets {name}: {name} will not run")
        logger.info("ucm config from %s: stores=%s, sparse method=%s", f"{CONFIG_FILE_ENV}={path}" if path else
                    EXTRA_CONFIG_KEY, [s.name for s in config.stores], name)
        return config


def _load_yaml(path: str) -> Mapping[Any, Any]:
    """Read the config file; every failure names the env var and the path."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as err:
        raise UcmConfigError(CONFIG_FILE_ENV, f"cannot read {path!r}: {err.strerror or err}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UcmConfigError(CONFIG_FILE_ENV, f"{path!r} is not valid YAML: {err}") from None
    if not isinstance(data, Mapping):
        raise UcmConfigError(CONFIG_FILE_ENV, f"{path!r} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def env_choice(name: str, choices: tuple[str, ...], env: Mapping[str, str] = os.environ) -> str:
    """An implementation switch from the environment (``UCM_ROPE_KERNEL``,
    ``UCM_LOAD_KERNEL``): one of ``choices``, the first when unset or empty, anything
    else refused with the allowed values. Read per call, so tests and benchmarks can
    flip it."""
    value = env.get(name, "").strip().lower() or choices[0]
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def sparse_enabled(env: Mapping[str, str] = os.environ) -> bool:
    """Read ``ENABLE_SPARSE``; an unrecognized value is an error rather than a silent "off"."""
    raw = env.get(ENABLE_SPARSE_ENV)
    value = "" if raw is None else raw.strip().lower()
    if value in _TRUE_WORDS or value in _FALSE_WORDS:
        return value in _TRUE_WORDS
    allowed = ", ".join(repr(w) for w in (*_TRUE_WORDS, *_FALSE_WORDS[1:]))
    raise UcmConfigError(ENABLE_SPARSE_ENV, f"must be one of {allowed} (case-insensitive) or unset, got {raw!r}")
