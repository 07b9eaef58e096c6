"""A node's process generation in its own storage (flame.transport.generation): a broker that
lost the retained status cannot reset it (red-team attacks 2-4 on issue 22)."""

from __future__ import annotations

from pathlib import Path

from flame.clients.minio_client import FileStore
from flame.transport.generation import GenerationStore


def test_the_generation_is_kept_and_a_bad_copy_reads_as_zero(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    store.ensure_bucket()
    keeper = GenerationStore(store, "study", "node-2")
    assert keeper.load() == 0
    keeper.save(3)
    assert GenerationStore(store, "study", "node-2").load() == 3  # the next process sees it
    assert GenerationStore(store, "study", "node-1").load() == 0  # per node
    store.put_bytes(keeper.key, b"not json")
    assert keeper.load() == 0
    store.put_bytes(keeper.key, b'{"generation": -4}')
    assert keeper.load() == 0
