"""scripts/train_curves.py: window means of every step's training loss, read back from TensorBoard events,
a restarted (resumed) run's later file winning for a step logged twice."""
import pytest

import train_curves


def _events(run_dir, losses: dict):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(run_dir / "tensorboard"))
    for step, loss in losses.items():
        w.add_scalar("train/loss", loss, step)
    w.close()


def test_window_means_and_resume(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _events(a, {s: float(s) for s in range(1, 6)})
    _events(b, {1: 1.0, 2: 9.0})
    import time
    time.sleep(1.1)                              # event files are named by the second they were opened
    _events(b, {2: 2.0, 3: 3.0})                 # the resumed run logs step 2 again
    out = train_curves.table([str(a), str(b)], 2).splitlines()
    assert out[0] == "| steps | a | b |"
    assert out[2:] == ["| 1–2 | 1.500 | 1.500 |", "| 3–4 | 3.500 | 3.000 |", "| 5–5 | 5.000 | – |"]


def test_errors(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no TensorBoard events"):
        train_curves.main([str(tmp_path)])
    with pytest.raises(SystemExit):
        train_curves.main([str(tmp_path), "--window", "0"])
    assert "--window must be positive" in capsys.readouterr().err
