"""Store factory: registry names, config coercion, tier chains."""

from __future__ import annotations

import dataclasses
from typing import Optional

import pytest

from ucm.store import (
    KVStoreBase,
    Task,
    UcmDramStore,
    UcmNfsStore,
    UcmPipelineStore,
    build_store_chain,
    create_store,
    register_store,
    registered_stores,
)
from ucm.store import factory


@dataclasses.dataclass
class FakeNfsConfig:
    storage_backends: str
    capacity_bytes: Optional[int] = None
    io_threads: int = 4
    unrelated_field: str = "ignored"


class NullStore(KVStoreBase):
    def lookup(self, keys):
        return [False] * len(keys)

    def load(self, keys, layout):
        return Task.completed([None] * len(keys), "null load")

    def dump(self, keys, tensors, layout):
        return Task.completed(0, "null dump")


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(factory, "_REGISTRY", dict(factory._REGISTRY))


def test_builtin_names_are_registered():
    assert {"UcmDramStore", "UcmNfsStore", "UcmPipelineStore"} <= set(registered_stores())


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="UcmDramStore.*UcmNfsStore"):
        create_store("UcmMysteryStore", {})


def test_duplicate_registration_is_rejected(clean_registry):
    register_store("NullStore", NullStore)
    with pytest.raises(ValueError, match="already registered"):
        register_store("NullStore", NullStore)
    with pytest.raises(ValueError):
        register_store("UcmDramStore", NullStore)
    with pytest.raises(TypeError):
        register_store("NotAStore", dict)
    assert isinstance(create_store("NullStore"), NullStore)


def test_config_as_dict_dataclass_or_object(tmp_path):
    dram = create_store("UcmDramStore", {"capacity_bytes": 1234})
    assert isinstance(dram, UcmDramStore) and dram.capacity_bytes == 1234
    nfs = create_store("UcmNfsStore", FakeNfsConfig(str(tmp_path), capacity_bytes=10_000, io_threads=2))
    assert nfs.root == str(tmp_path) and nfs.capacity_bytes == 10_000 and nfs.io_threads == 2
    nfs.close()

    class Attrs:
        capacity_bytes = 99

    assert create_store("UcmDramStore", Attrs()).capacity_bytes == 99
    with pytest.raises(ValueError, match="capcity_bytes"):
        create_store("UcmDramStore", {"capcity_bytes": 1})


def test_chain_of_one_is_the_store_itself_and_of_two_is_a_pipeline(tmp_path):
    single = build_store_chain([("UcmDramStore", {"capacity_bytes": 1024})])
    assert isinstance(single, UcmDramStore)
    chain = build_store_chain(
        [("UcmDramStore", {"capacity_bytes": 1024}), ("UcmNfsStore", {"storage_backends": str(tmp_path)})]
    )
    assert isinstance(chain, UcmPipelineStore)
    assert [type(t) for t in chain.tiers] == [UcmDramStore, UcmNfsStore]
    chain.close()
    with pytest.raises(ValueError):
        build_store_chain([])


def test_pipeline_from_config_names(tmp_path):
    pipe = create_store(
        "UcmPipelineStore",
        {"tiers": [("UcmDramStore", {"capacity_bytes": 1024}),
                   {"name": "UcmNfsStore", "config": {"storage_backends": str(tmp_path)}}]},
    )
    assert [type(t) for t in pipe.tiers] == [UcmDramStore, UcmNfsStore]
    pipe.close()
