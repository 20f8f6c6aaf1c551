"""The data contract: every bad input is refused before any work, naming the file and rows."""
import logging
import os

import pandas as pd
import pytest

from conftest import cli, make_competition
from pipeline.core.config import load_config
from pipeline.core.inputs.data import read_test_table, read_train_table
from pipeline.core.errors import PipelineError
from pipeline.stages import folds as folds_stage


def cfg_for(root, *extra):
    return load_config(None, [f"data.root={root}", "data.image_ext=.png", "folds.n_splits=2", *extra])


@pytest.fixture
def comp(workdir):
    return make_competition(workdir / "comp", {"a": 4, "b": 4, "c": 3})


def test_good_competition_reads(comp):
    df = read_train_table(cfg_for(comp).data)
    assert len(df) == 11 and set(df["label"]) == {"a", "b", "c"}
    assert all(os.path.isfile(p) for p in df["path"])


def test_integer_labels_stay_integers_and_leading_zero_strings_stay_strings(workdir):
    root = make_competition(workdir / "ints", {3: 3, 10: 3})
    assert read_train_table(cfg_for(root).data)["label"].tolist()[:1] == [3]
    root = make_competition(workdir / "zeros", {"007": 3, "010": 3})
    assert set(read_train_table(cfg_for(root).data)["label"]) == {"007", "010"}


def test_missing_csv(comp):
    (comp / "train.csv").unlink()
    with pytest.raises(PipelineError, match="train table not found: .*train.csv"):
        read_train_table(cfg_for(comp).data)


def test_missing_columns(comp):
    with pytest.raises(PipelineError, match=r"missing column\(s\) \['species'\]"):
        read_train_table(cfg_for(comp, "data.label_col=species").data)


def test_missing_images_reports_count_and_first_few(comp):
    for p in list((comp / "train").iterdir())[:7]:
        p.unlink()
    with pytest.raises(PipelineError, match=r"7 of 11 image file\(s\) missing: .* and 2 more"):
        read_train_table(cfg_for(comp).data)


def test_unreadable_and_zero_byte_images(comp):
    (comp / "train" / "img0001.png").write_bytes(b"not an image at all")
    with pytest.raises(PipelineError, match=r"unreadable image.*img0001.png"):
        read_train_table(cfg_for(comp).data)
    (comp / "train" / "img0001.png").write_bytes(b"")
    with pytest.raises(PipelineError, match=r"empty \(0 bytes\).*img0001.png"):
        read_train_table(cfg_for(comp).data)


def test_truncated_image_found_by_full_check(comp):
    p = comp / "train" / "img0002.png"
    p.write_bytes(p.read_bytes()[:60])
    with pytest.raises(PipelineError, match=r"unreadable image.*img0002.png"):
        read_train_table(cfg_for(comp, "data.check_images=full").data)


def test_duplicate_ids(comp):
    df = pd.read_csv(comp / "train.csv")
    pd.concat([df, df.iloc[[0]]]).to_csv(comp / "train.csv", index=False)
    with pytest.raises(PipelineError, match=r"1 duplicate id\(s\): 'img0000'"):
        read_train_table(cfg_for(comp).data)


@pytest.mark.parametrize("bad_id", ["../secret", "/etc/passwd", "sub/../../x"])
def test_ids_escaping_the_image_folder(comp, bad_id):
    df = pd.read_csv(comp / "train.csv")
    df.loc[3, "image_id"] = bad_id
    df.to_csv(comp / "train.csv", index=False)
    with pytest.raises(PipelineError, match=r"point outside .*row 5"):
        read_train_table(cfg_for(comp).data)


def test_symlink_leaving_the_folder(comp, workdir):
    outside = workdir / "outside.png"
    (comp / "train" / "img0000.png").rename(outside)
    os.symlink(outside, comp / "train" / "img0000.png")
    with pytest.raises(PipelineError, match="point outside"):
        read_train_table(cfg_for(comp).data)


def test_nan_label(comp):
    df = pd.read_csv(comp / "train.csv")
    df.loc[2, "label"] = None
    df.to_csv(comp / "train.csv", index=False)
    with pytest.raises(PipelineError, match=r"empty value in column 'label' at row\(s\) 4"):
        read_train_table(cfg_for(comp).data)


def test_empty_class_list_and_single_class(workdir):
    root = make_competition(workdir / "one", {"a": 5})
    with pytest.raises(PipelineError, match=r"1 class\(es\).*at least 2"):
        read_train_table(cfg_for(root).data)
    pd.DataFrame(columns=["image_id", "label"]).to_csv(root / "train.csv", index=False)
    with pytest.raises(PipelineError, match="no training images"):
        read_train_table(cfg_for(root).data)


def test_class_with_fewer_images_than_folds_is_refused_unless_allowed(workdir, caplog):
    root = make_competition(workdir / "rare", {"a": 8, "b": 8, "c": 2})
    with pytest.raises(PipelineError, match=r"train.csv: 1 class\(es\) with fewer images than folds \(4\): c \(2\)"):
        folds_stage.run(cfg_for(root, "folds.n_splits=4"))
    assert not list((workdir / "folds").glob("*.csv")) if (workdir / "folds").exists() else True
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        assert folds_stage.run(cfg_for(root, "folds.n_splits=4", "folds.rare_classes=allow"))
    assert "fewer images than folds" in caplog.text and "c (2)" in caplog.text


def test_folders_layout(workdir):
    root = workdir / "fgvc"
    make_competition(workdir / "tmp", {"x": 3, "y": 4}, with_ext_in_id=True)
    for c in ("x", "y"):
        (root / "train" / c).mkdir(parents=True)
    df = pd.read_csv(workdir / "tmp" / "train.csv")
    for image_id, label in zip(df["image_id"], df["label"]):
        (workdir / "tmp" / "train" / image_id).rename(root / "train" / label / image_id)
    cfg = load_config(None, [f"data.root={root}", "data.layout=folders", "folds.n_splits=2"])
    t = read_train_table(cfg.data)
    assert sorted(t["label"].unique()) == ["x", "y"] and len(t) == 7
    assert t["id"].iloc[0].startswith("x/")


def test_test_table_follows_sample_submission_order_and_checks_images(comp):
    cfg = cfg_for(comp)
    t = read_test_table(cfg.data)
    assert t["id"].tolist() == pd.read_csv(comp / "sample_submission.csv")["image_id"].tolist()
    (comp / "test" / "t002.png").unlink()
    with pytest.raises(PipelineError, match=r"1 test id\(s\) have no image"):
        read_test_table(cfg.data)


def test_empty_test_folder(comp):
    for p in (comp / "test").iterdir():
        p.unlink()
    with pytest.raises(PipelineError, match="no test images"):
        read_test_table(cfg_for(comp, "data.sample_submission=null").data)


def test_cli_bad_data_exits_nonzero_and_writes_nothing(comp, workdir):
    (comp / "train" / "img0003.png").unlink()
    r = cli(["folds", "--config", "none.yaml"], workdir)
    assert r.returncode == 2 and "config file not found" in r.stderr
    cfgfile = workdir / "c.yaml"
    cfgfile.write_text(f"data:\n  root: {comp}\n  image_ext: .png\nfolds:\n  n_splits: 2\n")
    r = cli(["folds", "--config", str(cfgfile)], workdir)
    assert r.returncode == 2
    assert "img0003.png" in r.stderr and "Traceback" not in r.stderr
    assert not list((workdir).glob("folds/*.csv"))


def test_two_ids_naming_one_file_are_refused(comp):
    df = pd.read_csv(comp / "train.csv", dtype=str)
    df.loc[1, "image_id"] = df.loc[0, "image_id"] + ".png"      # img0000.png next to img0000: one file
    df.loc[1, "label"] = "b"
    df.to_csv(comp / "train.csv", index=False)
    with pytest.raises(PipelineError, match=r"train.csv: 1 pair\(s\) of ids name the same image file: "
                                            r"rows 2 \('img0000'\) and 3 \('img0000.png'\)"):
        read_train_table(cfg_for(comp).data)


def test_a_hard_link_or_case_variant_is_the_same_file(comp):
    df = pd.read_csv(comp / "train.csv", dtype=str)
    os.link(comp / "train/img0000.png", comp / "train/IMG0000.png")   # what a case-insensitive disk does
    df.loc[1, "image_id"] = "IMG0000"
    df.to_csv(comp / "train.csv", index=False)
    with pytest.raises(PipelineError, match=r"same image file.*'IMG0000'"):
        read_train_table(cfg_for(comp).data)


def test_surrounding_whitespace_is_stripped_from_ids_and_labels(comp, caplog):
    df = pd.read_csv(comp / "train.csv", dtype=str)
    df.loc[0, "label"] = df.loc[0, "label"] + "  "
    df.loc[1, "image_id"] = " " + df.loc[1, "image_id"]
    df.to_csv(comp / "train.csv", index=False)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        out = read_train_table(cfg_for(comp).data)
    assert set(out["label"]) == {"a", "b", "c"} and out["id"].iloc[1] == "img0001"
    assert "stripped surrounding whitespace from 1 value(s) of column 'label'" in caplog.text


@pytest.mark.parametrize("name", ["None", "NA", "null", "nan", "N/A"])
def test_classes_named_like_missing_values_are_classes(comp, name):
    df = pd.read_csv(comp / "train.csv", dtype=str, keep_default_na=False)
    df.loc[df["label"] == "c", "label"] = name
    df.to_csv(comp / "train.csv", index=False)
    cfg = cfg_for(comp)
    out = read_train_table(cfg.data)
    assert sorted(out["label"].unique()) == sorted(["a", "b", name])
    folds_stage.run(cfg)
    from pipeline.core.inputs.data import read_folds
    back, classes = read_folds(cfg.folds_name)
    assert name in classes and (back["label"] == name).sum() == 3
