"""KV-cache stores: one interface, stackable tiers (DRAM in front of shared files).

See :mod:`ucm.store.base` for the contract and :mod:`ucm.store.factory` for
building stores from config names.
"""

from ucm.store.base import KVStoreBase, StoreError, Task
from ucm.store.dram_store import UcmDramStore
from ucm.store.factory import build_store_chain, create_store, register_store, registered_stores
from ucm.store.nfs_store import UcmNfsStore
from ucm.store.pipeline_store import UcmPipelineStore

__all__ = [
    "KVStoreBase",
    "StoreError",
    "Task",
    "UcmDramStore",
    "UcmNfsStore",
    "UcmPipelineStore",
    "build_store_chain",
    "create_store",
    "register_store",
    "registered_stores",
]
