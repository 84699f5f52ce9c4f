"""The one byte-count rule (common/tensor_bytes.py): a tensor costs its whole storage, each storage once."""
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from common.tensor_bytes import StorageCount, state_bytes


def test_views_share_their_storage_and_count_it_whole():
    x = torch.zeros(10, 4)                               # 160 bytes
    counted = StorageCount()
    assert counted.add(x[2:3]) == 160                    # a view keeps its whole storage
    assert counted.add(x.t()) == 0 and counted.add(x) == 0
    assert counted.add(torch.zeros(3, dtype=torch.bfloat16)) == 6


def test_already_counted_storages_are_skipped():
    w, b = torch.ones(5, 5), torch.ones(5)
    counted = StorageCount([w])
    assert counted.add(w[0]) == 0 and counted.add(b) == 20


def test_state_bytes_walks_containers_and_objects_once_per_storage():
    class Projector:
        def __init__(self, m):
            self.ortho = m

    m = torch.zeros(4, 2)
    state = {0: {"exp_avg": torch.zeros(8), "exp_avg_sq": torch.zeros(8), "step": torch.tensor(1.0)},
             1: {"projector": Projector(m), "alias": m[:, 0]}}
    assert state_bytes(state) == 32 + 32 + 4 + 32
    counted = StorageCount([m])
    assert state_bytes(state, counted) == 32 + 32 + 4 and state_bytes(state, counted) == 0


def test_fake_tensors_are_counted_like_real_ones():
    with FakeTensorMode():
        x = torch.empty(6, 7)
        counted = StorageCount()
        assert counted.add(x) == 168 and counted.add(x[1:]) == 0
