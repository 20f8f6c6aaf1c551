"""Losses and fold-parallel training."""
import pytest
import numpy as np
import torch

from conftest import cli, make_competition, run_cli
from pipeline.core.nets.losses import SoftTargetLoss, effective_number_weights


def test_losses():
    logits = torch.randn(6, 4)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    onehot = torch.eye(4)[y]
    ce = torch.nn.functional.cross_entropy(logits, y)
    assert torch.allclose(SoftTargetLoss("ce")(logits, onehot), ce)
    assert torch.allclose(SoftTargetLoss("focal", gamma=0.0)(logits, onehot), ce)     # focal(gamma=0) = CE
    assert SoftTargetLoss("focal", gamma=2.0)(logits, onehot) < ce                   # down-weights easy rows
    w = effective_number_weights(np.array([1000, 100, 10]), 0.999)
    assert np.isclose(w.sum(), 3) and w[0] < w[1] < w[2]                              # rare classes weigh more


@pytest.mark.slow
def test_gpus_option_trains_folds_in_parallel_processes(workdir):
    root = make_competition(workdir / "comp", {"a": 8, "b": 8}, size=24)
    cfg = workdir / "c.yaml"
    cfg.write_text(f"experiment: par\ndevice: cpu\ndata:\n  root: {root}\n  image_ext: .png\nfolds:\n  n_splits: 2\n"
                   "model:\n  arch: test_resnet\naug:\n  img_size: 32\n  cache: off\n"
                   "train:\n  epochs: 1\n  batch_size: 8\n  workers: 0\n  warmup_epochs: 0\n")
    assert cli(["folds", "--config", str(cfg)], workdir).returncode == 0
    r = run_cli(["train", "--config", str(cfg), "--gpus", "0,1"], workdir)
    assert r.returncode == 0, r.stderr
    assert "fold 0 -> GPU 0" in r.stderr and "fold 1 -> GPU 1" in r.stderr
    for k in (0, 1):
        assert (workdir / f"runs/par/fold{k}/summary.json").exists()
    r = cli(["folds", "--config", str(cfg), "--gpus", "0"], workdir)
    assert r.returncode == 2 and "folds does not take --gpus" in r.stderr
