"""training.state.health without DeepSpeed: which tensors the finiteness check sees, the record of the newest
checkpoint verified healthy, pruning around it, and setting a diverged checkpoint aside. The run's use of
them is tested end to end in tests/test_train_c4_health.py."""
import torch

from test_training_state_checkpoint import fake_checkpoint
from training.state import mark_healthy, nonfinite_tensors, prune, read_healthy, read_latest, set_aside, step_dirs



def test_nonfinite_tensors_sees_weights_buffers_and_optimizer_state():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert nonfinite_tensors(model, opt) == 0
    opt.state[model[0].weight]["exp_avg_sq"][0, 0] = float("inf")       # optimizer state only
    assert nonfinite_tensors(model, opt) == 1
    model[1].running_var[0] = float("nan")                              # a buffer too
    with torch.no_grad():
        model[0].bias[1] = float("-inf")
    assert nonfinite_tensors(model, opt) == 3
    assert nonfinite_tensors(model, None) == 2


def test_prune_never_deletes_the_newest_healthy_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for s in (5, 10, 15):
        fake_checkpoint(root, s)
    (root / "latest").write_text("step_15")
    mark_healthy(root, "step_5")          # step_10 and step_15 saved, not yet verified
    assert read_healthy(root) == "step_5"
    prune(root, 1)
    assert [p.name for p in step_dirs(root)] == ["step_5", "step_15"]
    (root / "healthy").write_text("../elsewhere")
    assert read_healthy(root) is None


def test_set_aside_keeps_the_diverged_checkpoint_and_points_latest_back(tmp_path):
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 5), fake_checkpoint(root, 10)
    (root / "latest").write_text("step_10")
    assert set_aside(root, "step_10", "step_5") == "step_10.diverged"
    assert [p.name for p in step_dirs(root)] == ["step_5"] and (root / "step_10.diverged").is_dir()
    assert read_latest(root) == "step_5"
    fake_checkpoint(root, 10)                                          # diverged again at the same step
    (root / "latest").write_text("step_10")
    assert set_aside(root, "step_10", None).startswith("step_10.diverged.")
    assert not (root / "latest").exists() and [p.name for p in step_dirs(root)] == ["step_5"]
