"""Persistence: the Store protocol, its SQL and in-memory implementations, and `open_store`
to pick one."""

from __future__ import annotations

from opsgate.store.base import DuplicateIdempotencyKey, Store, StoreError, StoreTx

MEMORY_URL = "memory://"


def open_store(url: str) -> Store:
    """`memory://` gives a MemoryStore (tests); anything else an SQL store (not migrated)."""
    if url.strip() == MEMORY_URL:
        from opsgate.store.memory import MemoryStore

        return MemoryStore()
    from opsgate.store.sql import SqlStore

    return SqlStore(url)


__all__ = ["DuplicateIdempotencyKey", "Store", "StoreError", "StoreTx", "open_store"]
