"""The one byte-count rule of the house: a tensor costs the bytes of its storage, and each storage is counted
once, by identity (a view keeps its whole storage; q, k and v saving one input, or one weight saved by
several ops, count it once). Every memory count uses it: velora.memory's saved activations, the planner's
optimizer state and the benchmarks'. Works on real and fake tensors alike; imports only torch.
"""
from __future__ import annotations

import torch


class StorageCount:
    """Storages counted so far. It holds each one, so that a freed storage's id cannot be reused by a new one
    while the count lives. `already`: tensors whose storages count as seen (e.g. a model's parameters)."""

    def __init__(self, already=()):
        self.storages: dict[int, torch.UntypedStorage] = {}
        for t in already:
            self.add(t)

    def add(self, t: torch.Tensor) -> int:
        """The bytes of `t`'s storage if it was not counted yet (it is now), else 0."""
        return self.add_storage(t.untyped_storage())

    def add_storage(self, st: torch.UntypedStorage) -> int:
        """The bytes of storage `st` if it was not counted yet (it is now), else 0."""
        if id(st) in self.storages:
            return 0
        self.storages[id(st)] = st
        return st.nbytes()


def storages(obj, found: dict | None = None, visited: set | None = None) -> dict:
    """{id(storage): storage} of every tensor reachable from `obj` through dicts, lists, tuples and
    objects' attributes (GaLore keeps its projector as an object)."""
    found = {} if found is None else found
    visited = set() if visited is None else visited
    if id(obj) in visited:
        return found
    visited.add(id(obj))
    if isinstance(obj, torch.Tensor):
        st = obj.untyped_storage()
        found[id(st)] = st
    elif isinstance(obj, dict):
        for v in obj.values():
            storages(v, found, visited)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            storages(v, found, visited)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        storages(vars(obj), found, visited)
    return found


def state_bytes(obj, counted: StorageCount | None = None) -> int:
    """Bytes of every tensor reachable from `obj` (an optimizer's state, GaLore's projectors), each storage
    once, skipping those already in `counted` (which is updated)."""
    counted = StorageCount() if counted is None else counted
    return sum(counted.add_storage(st) for st in storages(obj).values())
