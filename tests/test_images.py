"""The image path: files read as the user's viewer shows them, aspect ratio kept from the stored copy
to the crop, one stored copy per image set shared by folds, stages and scales, targets that would be
misread refused."""
import json
import os

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import SHARED, make_competition
from pipeline.cli import main as cli_main
from pipeline.core.inputs.augment import open_store, valid_transform
from pipeline.core.config import load_config
from pipeline.core.inputs.data import read_train_table
from pipeline.core.errors import PipelineError
from pipeline.core.inputs.images import ImageDataset, ImageStore, cache_report, read_image, stored_image
from pipeline.core.inputs.pixels import pixels


def _save_with_orientation(img: Image.Image, path, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, quality=95, exif=exif.tobytes())


def test_exif_rotated_jpeg_is_read_upright(tmp_path):
    upright = np.zeros((40, 20, 3), np.uint8)
    upright[:20] = (230, 20, 20)          # top half red
    upright[20:] = (20, 20, 230)          # bottom half blue
    # what a phone writes: the sensor's pixels (rotated) plus a tag saying "rotate 90 degrees clockwise"
    _save_with_orientation(Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90), tmp_path / "p.jpg", 6)
    with Image.open(tmp_path / "p.jpg") as raw:
        assert raw.size == (40, 20)                                  # stored sideways
    img = read_image(tmp_path / "p.jpg")
    assert img.shape == (40, 20, 3)
    assert img[5, 10, 0] > 200 and img[5, 10, 2] < 60               # red on top
    assert img[35, 10, 2] > 200 and img[35, 10, 0] < 60             # blue below
    assert stored_image(str(tmp_path / "p.jpg"), 10).shape == (20, 10, 3)   # the stored copy is upright too


def test_16_bit_png_keeps_its_gradient(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (8, 1))
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode in ("I;16", "I")                              # really 16 bits on disk
    img = read_image(tmp_path / "g16.png")
    assert img.dtype == np.uint8 and img.shape == (8, 256, 3)
    assert (img == 255).mean() < 0.9                                 # not clipped to white
    row = img[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and abs(row[128] - 128) <= 1 and (np.diff(row) >= 0).all()


def test_modes_grey_palette_cmyk_alpha_and_animation(tmp_path):
    Image.fromarray(np.full((5, 6), 77, np.uint8), "L").save(tmp_path / "g.png")
    rgba = np.zeros((5, 6, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, :3, 3] = 255                                   # left half opaque red, right half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    Image.fromarray(np.full((5, 6), 3, np.uint8), "L").convert("P").save(tmp_path / "p.png")
    Image.new("CMYK", (6, 5), (0, 255, 255, 0)).save(tmp_path / "c.jpg")       # CMYK red
    frames = [Image.new("RGB", (6, 5), c) for c in ((250, 0, 0), (0, 0, 250))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    g = read_image(tmp_path / "g.png")
    assert g.shape == (5, 6, 3) and (g == 77).all()
    a = read_image(tmp_path / "a.png")
    assert tuple(a[0, 0]) == (255, 0, 0) and tuple(a[0, 5]) == (255, 255, 255)   # alpha on white
    assert read_image(tmp_path / "p.png").shape == (5, 6, 3)
    c = read_image(tmp_path / "c.jpg")
    assert c.shape == (5, 6, 3) and c[2, 2, 0] > 200 and c[2, 2, 1] < 60
    f = read_image(tmp_path / "anim.gif")
    assert f[2, 2, 0] > 200 and f[2, 2, 2] < 60                     # the first frame
    Image.fromarray(np.full((4, 4), 7.5, np.float32), "F").save(tmp_path / "f.tif")
    with pytest.raises(PipelineError, match=r"f.tif.*floating-point pixels outside \[0, 1\]"):
        read_image(tmp_path / "f.tif")


def test_decompression_bomb_is_refused_naming_the_file(tmp_path, monkeypatch):
    root = make_competition(tmp_path / "comp", {"a": 4, "b": 4}, size=16)
    Image.new("L", (60, 60)).save(root / "train" / "img0002.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)            # 60 x 60 > 2 x 1000: PIL's bomb error
    with pytest.raises(PipelineError, match=r"refused image .*img0002.png.*decompression-bomb"):
        read_image(root / "train" / "img0002.png")
    cfg = load_config(None, [f"data.root={root}", "data.image_ext=.png", "folds.n_splits=2"])
    with pytest.raises(PipelineError, match=r"train.csv: 1 image\(s\) refused as decompression bombs.*img0002.png"):
        read_train_table(cfg.data)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)            # between 1x and 2x: PIL only warns; we refuse
    with pytest.raises(PipelineError, match=r"img0002.png"):
        read_image(root / "train" / "img0002.png")


def test_big_jpeg_is_decoded_at_reduced_size_into_the_store(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), np.uint8)).resize((4000, 3000)).save(
        tmp_path / "big.jpg", quality=80)
    draft = read_image(tmp_path / "big.jpg", short_side=256)
    assert draft.shape[:2] == (375, 500)                            # DCT-scaled by 1/8, still >= 256
    full = read_image(tmp_path / "big.jpg")
    assert full.shape[:2] == (3000, 4000)
    assert stored_image(str(tmp_path / "big.jpg"), 256).shape == (256, 341, 3)   # 4:3 kept


def _circle(h: int, w: int) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    cv2.circle(img, (w // 2, h // 2), min(h, w) // 3, (255, 255, 255), -1)
    return img


def _extent(img: np.ndarray) -> tuple[int, int]:
    ys, xs = np.nonzero(img[..., 0] > 127)
    return ys.max() - ys.min() + 1, xs.max() - xs.min() + 1


def test_two_to_one_image_keeps_its_aspect_ratio_through_store_and_validation(tmp_path):
    Image.fromarray(_circle(200, 400)).save(tmp_path / "wide.png")
    stored = stored_image(str(tmp_path / "wide.png"), 64)
    assert stored.shape == (64, 128, 3)
    keep = load_config(None, ["aug.img_size=32", "aug.crop_pct=1.0"])
    out = valid_transform(pixels(keep))(image=stored)["image"]
    h, w = _extent(out)
    assert out.shape == (32, 32, 3) and abs(h - w) <= 1               # the circle stays round
    squashed = valid_transform(pixels(load_config(None, ["aug.img_size=32", "aug.crop_pct=1.0", "aug.resize=squash"])))(
        image=stored)["image"]
    h, w = _extent(squashed)
    assert w < 0.7 * h                                                # squash makes it an ellipse


def test_squash_mode_reproduces_the_old_validation_crop(tmp_path):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (30, 50, 3), np.uint8)).save(tmp_path / "x.png")
    cfg = load_config(None, ["aug.img_size=24", "aug.resize=squash", "aug.crop_pct=0.875", "aug.cache=off"])
    big = round(24 / 0.875)
    # before 2026-11: load_square (decode, squash to big x big: area down / cubic up), then centre crop
    src = read_image(tmp_path / "x.png")
    shrink = src.shape[0] > big or src.shape[1] > big
    old = cv2.resize(src, (big, big), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
    top = (big - 24) // 2
    old = old[top:top + 24, top:top + 24]
    ds = ImageDataset(open_store(pixels(cfg), [str(tmp_path / "x.png")]), None, valid_transform(pixels(cfg)))
    assert np.array_equal(ds[0][0].numpy(), old)


def test_cache_gives_the_same_pixels_is_reused_and_bounded(tmp_path):
    root = make_competition(tmp_path / "c", {"a": 3, "b": 3}, size=40, ext=".jpg")
    paths = sorted(str(p) for p in (root / "train").iterdir())
    plain = ImageStore(paths, 24, "off")
    cached = ImageStore(paths, 24, "on", tmp_path / "cache")
    assert cached.dir is not None and (cached.dir / "pixels.u8").exists()
    for i in range(len(paths)):
        assert plain[i].shape == (24, 24, 3) and np.array_equal(plain[i], cached[i])
    assert np.array_equal(cached.subset([4, 1])[0], plain[4])
    size = (cached.dir / "pixels.u8").stat().st_size
    assert size == len(paths) * 24 * 24 * 3                           # each image once, nothing else
    again = ImageStore(paths, 24, "on", tmp_path / "cache")
    assert again.dir == cached.dir and (again.dir / "pixels.u8").stat().st_size == size
    (tmp_path / "cache" / "0123abcd_24px.u8").write_bytes(b"x" * 10)   # the old square format: swept
    other = ImageStore(paths[:3], 24, "on", tmp_path / "cache", max_gb=1.5 * size / 1e9)
    names = {r["store"] for r in cache_report(tmp_path / "cache")}
    assert names == {other.dir.name}                                  # the LRU bound removed the older store
    os.utime(paths[0], ns=(1, 1))                                     # a changed file: a new store, not stale pixels
    assert ImageStore(paths, 24, "on", tmp_path / "cache").dir != cached.dir


def test_a_jpeg_store_is_close_to_raw_identical_with_cache_on_or_off_and_a_tenth_of_the_disk(workdir):
    from pipeline.core.inputs.augment import pixel_record

    src = SHARED / "data" / "flowers5"
    if not src.is_dir():
        pytest.skip(f"real photos needed (JPEG error on noise says little): {src} is absent")
    paths = sorted(str(p) for p in sorted(src.glob("*/*.jpg"))[:24])
    raw = ImageStore(paths, 64, "on", workdir / "cache")
    jpeg = ImageStore(paths, 64, "on", workdir / "cache", fmt="jpeg", quality=90)
    off = ImageStore(paths, 64, "off", fmt="jpeg", quality=90)
    assert jpeg.dir != raw.dir and (jpeg.dir / "pixels.jpg").exists()          # its own store, raw's kept
    for i in range(len(paths)):
        a, b = raw[i].astype(np.float64), jpeg[i].astype(np.float64)
        assert a.shape == b.shape
        psnr = 10 * np.log10(255 ** 2 / np.mean((a - b) ** 2))
        assert psnr > 32, (paths[i], psnr)                                      # q90 4:4:4: within JPEG tolerance
        assert np.array_equal(jpeg[i], off[i])                                  # cache on == cache off, same format
    ratio = (jpeg.dir / "pixels.jpg").stat().st_size / (raw.dir / "pixels.u8").stat().st_size
    assert ratio < 0.35, ratio
    # the format is part of what made a model's pixels; auto turns to JPEG past store_raw_max_gb
    root = make_competition(workdir / "c", {"a": 3, "b": 3}, size=16)
    cfg = load_config(None, [f"data.root={root}", "data.image_ext=.png", "folds.n_splits=2", "experiment=j"])
    from pipeline.stages import folds as folds_stage
    folds_stage.run(cfg)
    assert pixels(cfg).store_format == "raw" and "store" not in pixel_record(pixels(cfg))
    small = load_config(None, [f"data.root={root}", "data.image_ext=.png", "folds.n_splits=2", "experiment=j",
                               "aug.store_raw_max_gb=1e-6"])
    assert pixels(small).store_format == "jpeg" and pixel_record(pixels(small))["store"] == "jpeg@90"


def test_folds_stages_and_scales_read_one_stored_file_per_image_set(workdir, capsys):
    from pipeline.stages import folds as folds_stage, infer as infer_stage, rebalance as rebalance_stage
    from pipeline.stages import train as train_stage

    root = make_competition(workdir / "comp", {"a": 6, "b": 6}, size=40, n_test=4)
    for p in (root / "train").iterdir():                               # non-square photos, 3:2
        Image.open(p).resize((60, 40)).save(p)
    cache = workdir / "cache"
    args = [f"data.root={root}", "data.image_ext=.png", "folds.n_splits=2", "model.arch=test_resnet",
            "aug.img_size=16", "aug.cache=on", f"aug.cache_dir={cache}", "train.epochs=1", "train.batch_size=4",
            "train.workers=0", "rebalance.variants=[joint,ncm]", "infer.views=[orig,five_crop]",
            "infer.scales=[1.0,1.15]", "experiment=one"]
    cfg = load_config(None, args)
    for stage in (folds_stage, train_stage, rebalance_stage, infer_stage):
        stage.run(cfg)
    stores = cache_report(cache)
    assert len(stores) == 2 and {r["images"] for r in stores} == {12, 4}      # train set, test set
    assert {r["side"] for r in stores} == {pixels(cfg).store_side}
    train_store = next(r for r in stores if r["images"] == 12)
    shapes = np.load(train_store["path"] / "index.npz")["shapes"]
    assert (shapes[:, 1] * 2 == shapes[:, 0] * 3).all()               # stored at 3:2, not squashed
    # another experiment at the same storage side (another TTA scale, other epochs) shares them
    other = load_config(None, [*args, "experiment=two", "infer.scales=[1.0]", "train.epochs=2"])
    train_stage.run(other)
    assert len(cache_report(cache)) == 2
    total = sum(r["bytes"] for r in cache_report(cache))
    assert cli_main(["cache", f"aug.cache_dir={cache}"]) == 0
    assert f"total {total / 1e6:.1f} MB in 2 store(s)" in capsys.readouterr().out
    assert cli_main(["cache", "--clear", f"aug.cache_dir={cache}"]) == 0
    assert cache_report(cache) == []


@pytest.mark.parametrize("labels,pattern", [
    (["scab", "rust", "scab rust"] * 4, r"column 'label' looks multi-label.*'scab rust'.*single-label"),
    (["a|b", "b|c", "a|c"] * 4, r"column 'label' looks multi-label.*'\|'.*'a\|b'"),
    (["0.5", "1.25", "3"] * 4, r"column 'label' holds non-integer numbers \('0.5', '1.25'\): a regression"),
])
def test_multi_label_and_float_targets_are_refused(tmp_path, labels, pattern):
    root = make_competition(tmp_path / "comp", {"a": 6, "b": 6}, size=8)
    t = pd.read_csv(root / "train.csv")
    t["label"] = labels
    t.to_csv(root / "train.csv", index=False)
    with pytest.raises(PipelineError, match=pattern):
        read_train_table(load_config(None, [f"data.root={root}", "data.image_ext=.png"]).data)


def test_species_names_with_spaces_and_integer_floats_are_accepted(tmp_path):
    root = make_competition(tmp_path / "comp", {"a": 6, "b": 6}, size=8)
    t = pd.read_csv(root / "train.csv")
    t["label"] = ["Danaus plexippus", "Vanessa cardui", "Papilio machaon"] * 4
    t.to_csv(root / "train.csv", index=False)
    cfg = load_config(None, [f"data.root={root}", "data.image_ext=.png", "data.check_images=none"])
    assert read_train_table(cfg.data)["label"].nunique() == 3
    t["label"] = ["1.0", "2.0", "3"] * 4
    t.to_csv(root / "train.csv", index=False)
    assert sorted(read_train_table(cfg.data)["label"].unique()) == [1, 2, 3]


def test_old_resize_ratio_key_names_its_replacement():
    with pytest.raises(PipelineError, match=r"aug.resize_ratio.*replaced by aug.crop_pct = 1 / resize_ratio"):
        load_config(None, ["aug.resize_ratio=1.14"])
    assert json.loads(json.dumps(load_config(None, []).to_dict()))["aug"]["resize"] == "keep_ratio"


def test_progress_is_logged_when_not_on_a_terminal(caplog):
    from pipeline.core.report.progress import progress

    with caplog.at_level("INFO", logger="pipeline"):
        assert list(progress(range(40), 40, "storing images at 64px", "img", every_s=0.0)) == list(range(40))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("storing images")]
    assert len(lines) == 10 and lines[-1].startswith("storing images at 64px: 40/40 img (100%)") and "left" in lines[0]
