"""Exact bytes of the tensors reachable from an object (an optimizer's state, GaLore's projectors),
each storage counted once. Works on real and fake tensors alike."""
from __future__ import annotations

import torch


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


def state_bytes(obj, seen: set | None = None) -> int:
    """Bytes of every tensor reachable from `obj`, skipping storages already in `seen` (updated)."""
    seen = set() if seen is None else seen
    total = 0
    for key, st in storages(obj).items():
        if key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total
