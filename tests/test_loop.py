"""The one training step and epoch loop (core/engine/loop.py): accumulation, clipping, fp16 loss scaling, the
schedule and EMA hooks; every trainer (stage 2, FixRes, cRT/LWS, lr-find, doctor) goes through it, so fp16
is loss-scaled everywhere; timm's Mixup lambda read through its public call."""
import numpy as np
import pytest
import torch

from conftest import make_competition
from pipeline.core.engine import training
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.core.engine.loop import Step, run_epoch


def _linear():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3)


def test_step_accumulates_then_updates_clips_and_schedules():
    model = _linear()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    seen = []
    step = Step(model, opt, torch.device("cpu"), accum_steps=2, clip_grad=1e-3, on_update=seen.append)
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    loss = lambda: model(torch.ones(2, 4)).pow(2).sum() * 100  # noqa: E731  (a large gradient)
    assert step.backward(loss(), 0) is False and torch.equal(model.weight, w0)   # accumulating: no update yet
    assert step.backward(loss(), 1) is True and seen == [1] and step.num_updates == 1
    moved = torch.cat([(model.weight - w0).flatten(), (model.bias - b0).flatten()]).detach()
    assert 0 < moved.norm() <= 1e-3 + 1e-6          # clipped to the total norm 1e-3 (lr 1: the step is the grad)
    assert all(p.grad is None for p in model.parameters())   # zeroed after the update


def test_fp16_scales_the_loss_and_bf16_does_not():
    model = _linear()
    fp16 = Step(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.device("cpu"), torch.float16)
    bf16 = Step(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.device("cpu"), torch.bfloat16)
    assert fp16.scaler is not None and bf16.scaler is None
    with fp16.autocast():
        out = model(torch.ones(2, 4))
    assert out.dtype == torch.float16
    fp16.backward(out.float().sum(), 0)
    assert fp16.num_updates == 1 and fp16.state_dict()["scale"] > 1


def test_run_epoch_sums_the_loss_syncs_and_stops_when_asked():
    model = _linear()
    step = Step(model, torch.optim.SGD(model.parameters(), lr=0.0), torch.device("cpu"))
    batches = [(torch.ones(2, 4) * i, None) for i in range(5)]
    syncs = []

    def loss(batch):
        return model(batch[0]).sum() * 0 + float(batch[0][0, 0]), 2   # loss i for batch i

    res = run_epoch(step, batches, loss, n_batches=5, sync_every=2, on_sync=lambda i, t, n: syncs.append((i, t, n)))
    assert res.steps == 5 and res.seen == 10 and res.loss_sum == pytest.approx(2 * (0 + 1 + 2 + 3 + 4))
    assert [s[0] for s in syncs] == [1, 3, 4]            # every 2nd batch and the last
    res = run_epoch(step, batches, loss, after_batch=lambda i, v: i == 2)
    assert res.steps == 3 and step.num_updates == 8


@pytest.mark.slow
def test_every_trainer_goes_through_the_step_so_fp16_is_loss_scaled(workdir, monkeypatch):
    """lr-find, stage 2, FixRes tuning, cRT/LWS and doctor all build a `Step`: with train.amp=fp16 each one
    scales its loss (FixRes and lr-find used to run fp16 backward unscaled)."""
    from pipeline.stages import folds as folds_stage, infer as infer_stage, rebalance as rebalance_stage
    from pipeline.stages import train as train_stage
    from pipeline.tools import doctor, lr_find

    made = []
    real_init = Step.__init__

    def recording(self, model, optimizer, device, dtype=None, **kw):
        real_init(self, model, optimizer, device, dtype, **kw)
        import inspect

        made.append((inspect.stack()[1].filename.rsplit("/", 2)[-2:], self.scaler is not None))

    monkeypatch.setattr(Step, "__init__", recording)
    root = make_competition(workdir / "comp", {"a": 10, "b": 8}, size=24, n_test=4)
    cfg = load_config(None, [f"data.root={root}", "data.image_ext=.png", "model.arch=test_resnet",
                             "aug.img_size=32", "aug.cache=off", "train.batch_size=8", "train.epochs=1",
                             "train.workers=0", "folds.n_splits=2", "train.warmup_epochs=0", "train.amp=fp16",
                             "rebalance.variants=[joint,crt]", "rebalance.crt_epochs=2", "infer.views=[orig]",
                             "infer.fixres.size=1.25", "infer.heads=[joint]"])
    folds_stage.run(cfg)
    try:
        lr_find.run(cfg, steps=6)
    except PipelineError as e:  # 6 fp16 steps of a tiny model: there may be no falling stretch to suggest from
        assert "never fell" in str(e)
    train_stage.run(cfg)
    rebalance_stage.run(cfg)
    infer_stage.run(cfg)
    doctor.measure(doctor.Bench.of(cfg), doctor.Mode("fp16", "fp16"), steps=1)
    where = {"/".join(f) for f, _ in made}
    assert {"tools/lr_find.py", "stages/train.py", "stages/infer.py", "nets/heads.py", "tools/doctor.py"} <= where
    assert all(scaled for f, scaled in made if f[-1] != "heads.py")   # cRT/LWS: fp32 features on CPU, no autocast


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_mix_lambda_mixes_per_row_targets_as_timm_mixes_labels(mode):
    """The lambda read through timm's public Mixup call, applied to one-hot targets, gives timm's own mixed
    targets, and the images are mixed identically."""
    t = load_config(None, ["train.mixup_alpha=0.4", "train.cutmix_alpha=1.0", f"train.mix_mode={mode}",
                           "train.batch_size=8"]).train
    x = torch.rand(8, 3, 16, 16)
    y = torch.randint(0, 5, (8,))
    np.random.seed(3)
    x_timm, target = training.build_mixup(t, 5)(x.clone(), y)
    np.random.seed(3)
    x_ours = x.clone()
    lam = training.mix_lambda(training.build_mixup(t, 5, per_row_targets=True), x_ours)
    one_hot = torch.nn.functional.one_hot(y, 5).float()
    assert torch.equal(x_ours, x_timm)
    assert torch.allclose(one_hot * lam + one_hot.flip(0) * (1 - lam), target, atol=1e-6)
