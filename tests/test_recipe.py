"""The fine-grained recipe's training options: timm policy augmentation, LDAM with deferred re-weighting,
linear probe and partial fine-tuning, attention pooling."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import make_competition
from pipeline.core.nets import models
from pipeline.core.inputs.augment import TimmPolicy, train_transform
from pipeline.core.config import load_config
from pipeline.core.inputs.data import read_folds
from pipeline.core.engine.distributed import Dist
from pipeline.core.errors import PipelineError
from pipeline.core.inputs.images import ImageDataset
from pipeline.core.nets.losses import SoftTargetLoss, effective_number_weights, ldam_margins
from pipeline.stages import folds as folds_stage
from pipeline.stages import train as train_stage
from pipeline.core.inputs.pixels import pixels

TINY = ["data.image_ext=.png", "experiment=tiny", "model.arch=test_resnet", "aug.img_size=32", "aug.cache=off",
        "train.batch_size=8", "train.epochs=2", "train.workers=0", "folds.n_splits=2", "train.warmup_epochs=0",
        "train.lr=0.01", "train.ema=false"]


def cfg_of(root, *extra):
    return load_config(None, [f"data.root={root}", *TINY, *extra])


@pytest.fixture
def comp(workdir):
    return make_competition(workdir / "comp", {"a": 12, "b": 10, "c": 8}, size=24)


class _Store:
    def __init__(self, imgs):
        self.imgs = imgs

    def __len__(self):
        return len(self.imgs)

    def __getitem__(self, i):
        return self.imgs[i]


def test_timm_policy_changes_images_per_epoch_and_replays_them_after_a_resume():
    cfg = load_config(None, ["aug.img_size=32", "aug.policy=rand-m9-mstd0.5-inc1", "aug.crop=resize_crop"])
    plain = load_config(None, ["aug.img_size=32", "aug.crop=resize_crop"])
    assert any(isinstance(t, TimmPolicy) for t in train_transform(pixels(cfg)).transforms)
    imgs = [(np.random.default_rng(i).random((40, 48, 3)) * 255).astype(np.uint8) for i in range(4)]
    ds = ImageDataset(_Store(imgs), np.zeros(4, int), train_transform(pixels(cfg)), seed=7)
    again = ImageDataset(_Store(imgs), np.zeros(4, int), train_transform(pixels(cfg)), seed=7)  # a resumed process
    base = ImageDataset(_Store(imgs), np.zeros(4, int), train_transform(pixels(plain)), seed=7)
    for i in range(4):
        e0, e1 = ds[(i, 0)][0], ds[(i, 1)][0]
        assert not torch.equal(e0, e1)  # another epoch, another augmentation
        assert torch.equal(e0, again[(i, 0)][0]) and torch.equal(e1, again[(i, 1)][0])  # replayed exactly
    assert sum(not torch.equal(ds[(i, 0)][0], base[(i, 0)][0]) for i in range(4)) >= 3  # the policy acts
    # the global generators timm draws from are left as they were
    state = np.random.get_state()[1].copy()
    ds[(0, 3)]
    assert np.array_equal(np.random.get_state()[1], state)
    with pytest.raises(PipelineError, match="aug.policy.*timm cannot read"):
        load_config(None, ["aug.policy=rand-q9"])


def test_ldam_margins_follow_n_to_the_minus_quarter_and_the_loss_subtracts_them():
    counts = np.array([160, 10, 1])
    m = ldam_margins(counts, 0.5)
    assert np.isclose(m.max(), 0.5) and m.argmax() == 2
    assert np.allclose(m / m[2], (counts / counts[2]) ** -0.25)
    loss = SoftTargetLoss("ldam", margins=m, scale=2.0)
    z = torch.randn(5, 3)
    y = torch.tensor([0, 1, 2, 2, 0])
    target = F.one_hot(y, 3).float()
    manual = F.cross_entropy(2.0 * (z - torch.as_tensor(m)[y][:, None] * target), y)
    assert torch.allclose(loss(z, target), manual)
    # soft (mixed) targets: each class's margin weighted by its share of the target
    soft = 0.7 * target + 0.3 * target.flip(0)
    assert torch.allclose(loss(z, soft), -(soft * F.log_softmax(2.0 * (z - soft * torch.as_tensor(m)), 1)).sum(1).mean())


def test_drw_switches_class_weights_on_at_its_epoch(comp):
    cfg = cfg_of(comp, "train.loss=ldam", "train.drw_epoch=1", "train.epochs=3")
    folds_stage.run(cfg)
    df, classes = read_folds(cfg.folds_name)
    r = train_stage.set_up(train_stage.Job.of(cfg), df, len(classes), 0, Dist())
    seen = []
    for epoch in range(3):
        train_stage.train_epoch(r, epoch)
        seen.append(None if r.nets.criterion.w is None else r.nets.criterion.w.numpy().copy())
    assert seen[0] is None
    want = effective_number_weights(r.data.counts, cfg.train.cb_beta)
    assert np.allclose(seen[1], want) and np.allclose(seen[2], want)
    with pytest.raises(PipelineError, match="train.drw_epoch"):
        cfg_of(comp, "train.drw_epoch=1", "train.class_weights=effective_number")


def _trained_and_initial(comp, *extra):
    cfg = cfg_of(comp, *extra)
    folds_stage.run(cfg)
    df, classes = read_folds(cfg.folds_name)
    r = train_stage.set_up(train_stage.Job.of(cfg), df, len(classes), 0, Dist())
    initial = {k: v.clone() for k, v in r.nets.model.state_dict().items()}
    for epoch in range(2):
        train_stage.train_epoch(r, epoch)
    return r.nets.model, initial


def test_linear_probe_moves_only_the_classifier(comp):
    model, initial = _trained_and_initial(comp, "train.freeze_backbone=true")
    after = model.state_dict()
    moved = [k for k in after if not torch.equal(after[k], initial[k]) and "num_batches_tracked" not in k]
    assert moved and all(k.startswith("fc.") for k in moved)  # BN statistics of the backbone included


def test_trainable_stages_freezes_exactly_the_earlier_stages(comp):
    model, initial = _trained_and_initial(comp, "model.arch=resnet10t", "train.trainable_stages=1")
    after = model.state_dict()
    moved = {k.split(".")[0] for k in after if not torch.equal(after[k], initial[k]) and "num_batches" not in k}
    assert moved == {"layer4", "fc"}  # timm's coarse groups of a ResNet: stem, layer1-4; the last one trains
    frozen, names = models.frozen_parameters(models.create_model(cfg_of(comp, "model.arch=resnet10t").model, 3), False, 2)
    assert names == ["0", "1", "2"]  # stem, layer1, layer2 frozen; layer3, layer4 (and the head) train
    with pytest.raises(PipelineError, match="trainable_stages"):
        cfg_of(comp, "train.freeze_backbone=true", "train.trainable_stages=1")


def test_attention_pooling_replaces_timm_pooling_at_any_size(comp):
    cfg = cfg_of(comp, "model.pool=attn", "model.arch=resnet10t")
    model = models.create_model(cfg.model, 3).eval()
    assert any(isinstance(m, models.AttnPool) for m in model.modules())
    for side in (32, 48, 40):  # progressive resizing, FixRes and TTA scales feed other sizes
        assert model(torch.randn(2, 3, side, side)).shape == (2, 3)
        assert models.features(model, torch.randn(2, 3, side, side)).shape == (2, model.num_features)
    # it trains end to end, and its parameters count as the head (a linear probe trains them too)
    assert {id(p) for p in model.global_pool.parameters()} <= models.head_parameters(model)
    folds_stage.run(cfg)
    summaries = train_stage.run(cfg)
    assert all(np.isfinite(s["score"]) for s in summaries)


def test_knn_with_k1_is_the_brute_force_nearest_neighbour_and_survives_a_save(tmp_path):
    from pipeline.core.nets.heads import Head, knn_head

    rng = np.random.default_rng(0)
    tr, y = rng.normal(size=(60, 8)).astype(np.float32), rng.integers(0, 4, 60)
    va = rng.normal(size=(25, 8)).astype(np.float32)
    h = knn_head(tr, y, 4, k=1, temperature=0.05)
    c = tr.mean(0)
    unit = lambda a: (a - c) / np.linalg.norm(a - c, axis=1, keepdims=True)  # noqa: E731
    nearest = y[(unit(va) @ unit(tr).T).argmax(1)]
    assert np.array_equal(h.logits(va).argmax(1), nearest)
    h.save(tmp_path / "knn.safetensors", {"variant": "knn"})
    back, _ = Head.load(tmp_path / "knn.safetensors")
    assert back.k == 1 and np.allclose(back.logits(va), h.logits(va))
    assert np.allclose(back.torch_logits(torch.as_tensor(va)).numpy(), h.logits(va), atol=1e-5)
    # more neighbours vote: with k = all and a large T every class's score is its share of the bank
    wide = knn_head(tr, y, 4, k=60, temperature=100.0)
    share = np.bincount(y, minlength=4) / 60
    assert np.allclose(np.exp(wide.logits(va[:1]))[0] / np.exp(wide.logits(va[:1]))[0].sum(), share, atol=0.02)


def test_pca_whitening_gives_identity_covariance_on_the_training_features():
    from pipeline.core.nets.heads import ncm_head, pca_whitening

    rng = np.random.default_rng(1)
    tr = (rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6)) + 3).astype(np.float32)
    c, proj = pca_whitening(tr)
    white = (tr - c) @ proj
    assert np.allclose(np.cov(white, rowvar=False), np.eye(6), atol=1e-3)
    head = ncm_head(tr, rng.integers(0, 3, 500), 3, whiten=True)
    assert head.proj is not None and head.weight.shape == (3, 6)


def test_knn_and_pca_heads_in_stage3_are_tuned_honestly_and_used_by_stage4(comp):
    from pipeline.core.files.artifacts import read_json
    from pipeline.stages import infer as infer_stage
    from pipeline.stages import rebalance as rebalance_stage

    cfg = cfg_of(comp, "rebalance.variants=[joint,ncm,ncm_pca,knn,knn_pca]", "rebalance.knn_k_grid=[1,3]",
                 "infer.heads=[knn,ncm_pca]", "infer.views=[orig]")
    folds_stage.run(cfg)
    train_stage.run(cfg)
    rebalance_stage.run(cfg)
    for k in range(2):
        v = read_json(cfg.run_dir.fold(k).rebalance_summary)["variants"]
        assert v["knn"]["k_t"][0] in (1, 3) and v["knn"]["tuned"] and len(v["knn"]["chosen_per_inner_fold"]) == 2
        assert np.isfinite(v["knn_pca"]["metrics"]["score"]) and np.isfinite(v["ncm_pca"]["metrics"]["score"])
    s4 = infer_stage.run(cfg)
    assert {"knn", "ncm_pca"} <= set(s4["heads"])


@pytest.mark.slow
def test_class_activation_maps_highlight_the_patch_that_defines_the_class():
    import timm

    rng = np.random.default_rng(0)
    S, P = 96, 24

    def make(n):
        x = rng.normal(0.2, 0.1, size=(n, 3, S, S)).astype(np.float32)
        y = rng.integers(0, 2, n)
        where = [tuple(rng.integers(0, S - P, 2)) for _ in range(n)]
        for i, (r, c) in enumerate(where):
            if y[i] == 1:  # class 1: one bright square somewhere; class 0: none
                x[i, :, r:r + P, c:c + P] = 1.0
        return torch.tensor(x), torch.tensor(y), where

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=2)
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    x, y, _ = make(128)
    for _ in range(40):
        idx = torch.randint(0, 128, (32,))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    xt, yt, where = make(24)
    cams = models.class_activation_maps(model, xt, torch.ones(24, dtype=torch.long))
    assert cams.shape == (24, S, S) and float(cams.min()) >= 0 and float(cams.max()) <= 1
    hits = []
    for i in np.flatnonzero(yt.numpy() == 1):
        mask = np.zeros((S, S), bool)
        r, c = where[i]
        mask[r:r + P, c:c + P] = True
        cam = cams[i].numpy()
        hits.append(cam[mask].mean() > 2 * cam[~mask].mean())
    assert np.mean(hits) >= 0.8, hits


@pytest.mark.slow
def test_report_draws_class_activation_maps_when_the_feature_map_allows(comp, workdir):
    from PIL import Image

    from pipeline.stages import infer as infer_stage
    from pipeline.stages import rebalance as rebalance_stage
    from pipeline.tools.reports import experiment_page

    cfg = cfg_of(comp, "aug.img_size=96", "train.epochs=1", "rebalance.variants=[joint]", "infer.views=[orig]")
    folds_stage.run(cfg)
    train_stage.run(cfg)
    rebalance_stage.run(cfg)
    infer_stage.run(cfg)
    page = experiment_page.write("tiny", workdir / "reports", workdir / "runs")
    assert "](cam.png)" in page.read_text()
    with Image.open(workdir / "reports/tiny/cam.png") as im:
        assert im.format == "PNG" and im.size[0] > 300
    # at 32 px the map of this network is 1x1: no pictures, no error
    small = cfg_of(comp, "experiment=small", "train.epochs=1", "rebalance.variants=[joint]", "infer.views=[orig]")
    train_stage.run(small)
    page = experiment_page.write("small", workdir / "reports", workdir / "runs")
    assert "cam.png" not in page.read_text()


def test_the_leaderboard_recipe_names_the_pretrained_fine_tune_controls():
    """The pretrained fine-tune controls (LP-FT, frozen BN statistics, a lower backbone lr) are named in the
    leaderboard's recipe column when set; the default short fine-tune (the plain recipe at batch 32, #47) names none."""
    from pipeline.tools.reports.leaderboard import recipe

    lpft = load_config(None, ["model.pretrained_path=w.safetensors", "train.epochs=2", "train.head_init=probe",
                              "train.bn_stats=frozen", "train.backbone_lr_mult=0.3"])
    text = recipe(lpft.model, lpft.aug, lpft.train, None, [], None, False)
    assert all(w in text for w in ("LP-FT", "BN stats frozen", "backbone lr x0.3")), text
    plain = load_config(None, ["model.pretrained_path=w.safetensors", "train.epochs=2"])
    text = recipe(plain.model, plain.aug, plain.train, None, [], None, False)
    assert not any(w in text for w in ("LP-FT", "BN stats", "backbone lr")), text
    probe = load_config(None, ["model.pretrained_path=w.safetensors", "train.epochs=0"])
    assert "LP-FT" not in recipe(probe.model, probe.aug, probe.train, None, [], None, False)
