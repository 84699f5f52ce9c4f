"""training/step.py: one optimizer step reads the loss on the host once, not once per micro-batch."""
import torch

from training.distributed import DistInfo
from training.step import OptimizerStep


class Watched(torch.Tensor):
    """A loss whose every read on the host (float, item, tolist) is counted: each is a device sync on a GPU."""

    reads = 0

    def __float__(self):
        Watched.reads += 1
        return super().__float__()

    def item(self):
        Watched.reads += 1
        return super().item()

    def tolist(self):
        Watched.reads += 1
        return super().tolist()


class FakeEngine:
    def __init__(self):
        self.forwards = 0

    def __call__(self, input_ids, labels):
        self.forwards += 1
        return torch.tensor(0.5 * self.forwards).as_subclass(Watched)

    def backward(self, loss):
        pass

    def step(self):
        pass

    def get_lr(self):
        return [1e-3]

    def get_global_grad_norm(self):
        return 1.0

    def zero_optimization_stage(self):
        return 2

    def bfloat16_enabled(self):
        return True


def test_the_loss_is_summed_on_the_device_and_read_once_per_step():
    labels = torch.tensor([[1, 2, 3, -100], [4, 5, -100, -100]])
    batches = iter([(labels.clamp(min=0), labels)] * 8)
    step = OptimizerStep(FakeEngine(), batches, accum=4, dist=DistInfo(0, 1, 0, torch.device("cpu"), "gloo"))
    Watched.reads = 0
    mean, tokens, positions, grad_norm, lr = step(1)
    assert Watched.reads == 1
    assert mean == (0.5 + 1.0 + 1.5 + 2.0) / 4 and tokens == 4 * 3 and positions == 4 * 5
    assert (grad_norm, lr) == (1.0, 1e-3)
