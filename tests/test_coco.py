"""data.layout: coco: COCO-style train/test JSON as iNaturalist, Herbarium and FGVCx ship them."""
import json

import pandas as pd
import pytest

from conftest import stage4_probs
from pipeline.core.config import load_config
from pipeline.core.inputs.data import read_test_table, read_train_table
from pipeline.core.errors import PipelineError
from pipeline.stages import folds as folds_stage
from pipeline.tools.demo import coco_competition


def coco_cfg(root, *extra):
    return load_config(None, [f"data.root={root}", "data.layout=coco", "data.train_json=train.json",
                              "data.test_json=test.json", "data.sample_submission=null", "folds.n_splits=2",
                              "experiment=coco", *extra])


@pytest.fixture
def comp(workdir):
    return coco_competition(workdir / "inat", [6, 5, 4], size=12, n_test=4, locations=3)


def edit(root, change):
    data = json.loads((root / "train.json").read_text())
    change(data)
    (root / "train.json").write_text(json.dumps(data))


def test_train_and_test_json_read_as_ids_category_ids_paths_and_groups(comp):
    df = read_train_table(coco_cfg(comp, "data.group_col=location").data)
    data = json.loads((comp / "train.json").read_text())
    assert df["id"].tolist() == [str(im["id"]) for im in data["images"]]
    want = {str(a["image_id"]): a["category_id"] for a in data["annotations"]}
    assert df["label"].tolist() == [want[i] for i in df["id"]]            # the category ids, as integers
    assert sorted(df["label"].unique()) == [1000, 1001, 1002]
    assert df["path"].tolist() == [str(comp / im["file_name"]) for im in data["images"]]
    assert df["group"].tolist() == [str(im["location"]) for im in data["images"]]
    names = read_train_table(coco_cfg(comp, "data.category_label=name").data)
    assert sorted(names["label"].unique()) == ["Species 1000", "Species 1001", "Species 1002"]
    test = read_test_table(coco_cfg(comp).data)
    assert test["id"].tolist() == [str(10_000_000 + i) for i in range(4)]
    assert test["path"].tolist() == [str(comp / f"test/{i:07d}.png") for i in range(4)]
    # a sample submission fixes the order and must list the same ids
    pd.DataFrame({"Id": test["id"][::-1], "Predicted": 0}).to_csv(comp / "sample.csv", index=False)
    sub = read_test_table(coco_cfg(comp, "data.sample_submission=sample.csv", "data.id_col=Id").data)
    assert sub["id"].tolist() == test["id"][::-1].tolist()
    pd.DataFrame({"Id": test["id"][:3], "Predicted": 0}).to_csv(comp / "short.csv", index=False)
    with pytest.raises(PipelineError, match=r"list different test images: 0 id\(s\) only in the sample .* 1 only"):
        read_test_table(coco_cfg(comp, "data.sample_submission=short.csv", "data.id_col=Id").data)


def test_grouped_folds_keep_a_location_in_one_fold(comp):
    cfg = coco_cfg(comp, "data.group_col=location")
    folds_stage.run(cfg)
    df = pd.read_csv(cfg.folds_csv)
    assert (df.groupby("group")["fold"].nunique() == 1).all()
    assert set(df["label"]) == {1000, 1001, 1002}


@pytest.mark.parametrize("change, message", [
    (lambda d: d["images"].append(dict(d["images"][0])), r"1 duplicate image id\(s\): '0'"),
    (lambda d: d["images"].append({**d["images"][0], "id": 99}), r"file_name\(s\) listed twice: 'train/1000/0000000.png'"),
    (lambda d: d["images"][1].update(file_name="../outside.png"), r"point outside .*images\[1\]: \.\./outside\.png"),
    (lambda d: d["images"][2].update(file_name="train/1000/missing.png"), r"1 of 15 image file\(s\) missing"),
    (lambda d: d["images"][3].pop("file_name"), r"lack an id or a file_name: 'images\[3\]'"),
    (lambda d: d["annotations"].pop(4), r"1 image\(s\) have no annotation: '4' \(test images belong in data.test_json"),
    (lambda d: d["annotations"].append({"id": 99, "image_id": 0, "category_id": 1001}),
     r"1 image\(s\) carry annotations of several categories, e.g. image id\(s\) '0': multi-label"),
    (lambda d: d["annotations"].append({"id": 99, "image_id": 12345, "category_id": 1001}),
     r"name image ids not in 'images': '12345'"),
    (lambda d: d["annotations"][0].update(category_id=7), r"category id\(s\) used by annotations are not in "
                                                           r"'categories': '7'"),
    (lambda d: d.pop("annotations"), "no 'annotations' list"),
    (lambda d: d.update(images=[]), r"train.json: its 'images' list is empty"),
    (lambda d: d["annotations"][2].update(category_id=None),  # once: valid ids listed as floats, 'nan' among them
     r"1 annotation\(s\) with a category_id that is not an integer .*'annotations\[2\] \(category_id: null\)'"),
    (lambda d: d["annotations"][1].update(image_id=1.5), r"'annotations\[1\] \(image_id: 1.5\)'"),
    (lambda d: d["images"][0].update(id=None), r"'images\[0\] \(id: null\)'"),
], ids=["duplicate id", "file twice", "escaping path", "missing file", "no file_name", "no annotation", "multi-label",
        "unknown image", "unknown category", "no annotations", "no images", "null category", "fractional image id",
        "null image id"])
def test_bad_annotations_are_refused_naming_the_entry(comp, change, message):
    edit(comp, change)
    with pytest.raises(PipelineError, match=message):
        read_train_table(coco_cfg(comp).data)


def test_an_empty_test_json_is_refused_naming_it(comp):
    data = json.loads((comp / "test.json").read_text())
    (comp / "test.json").write_text(json.dumps({**data, "images": []}))
    with pytest.raises(PipelineError, match=r"test.json: its 'images' list is empty"):
        read_test_table(coco_cfg(comp).data)


def test_one_category_annotated_twice_is_one_label_and_bad_json_or_keys_are_named(comp):
    edit(comp, lambda d: d["annotations"].append({"id": 99, "image_id": 0, "category_id": 1000}))
    assert read_train_table(coco_cfg(comp).data)["label"].iloc[0] == 1000   # two boxes of one category: one label
    with pytest.raises(PipelineError, match="data.group_col 'site' is neither a field of the images"):
        read_train_table(coco_cfg(comp, "data.group_col=site").data)
    (comp / "broken.json").write_text("{")
    with pytest.raises(PipelineError, match="broken.json: not readable as JSON"):
        read_train_table(coco_cfg(comp, "data.train_json=broken.json").data)
    (comp / "list.json").write_text("[]")
    with pytest.raises(PipelineError, match="needs an 'images' list"):
        read_train_table(coco_cfg(comp, "data.train_json=list.json").data)
    with pytest.raises(PipelineError, match="not found: .*nothing.json"):
        read_train_table(coco_cfg(comp, "data.train_json=nothing.json").data)
    edit(comp, lambda d: d["categories"].append({"id": 5, "name": "Species 1000"}))
    with pytest.raises(PipelineError, match="category names repeat"):
        read_train_table(coco_cfg(comp, "data.category_label=name").data)


@pytest.mark.slow
def test_an_inaturalist_style_competition_runs_to_a_top_k_submission_scored_by_map(workdir):
    from pipeline.core.files.artifacts import read_json
    from pipeline.stages import ensemble as ens_stage, infer as infer_stage, rebalance as rebalance_stage
    from pipeline.stages import train as train_stage
    from pipeline.tools.reports.leaderboard import build

    root = coco_competition(workdir / "inat", [8, 8, 6, 6], size=16, n_test=5)
    cfg = coco_cfg(root, "model.arch=test_resnet", "aug.img_size=16", "aug.cache=off", "train.batch_size=8",
                   "train.epochs=1", "train.workers=0", "rebalance.variants=[joint,tau]", "infer.views=[orig]",
                   "infer.heads=[tau]", "eval.metric=map_at_k", "eval.top_k=3", "ensemble.submission=topk",
                   "ensemble.top_k=3", "data.id_col=Id", "data.label_col=Predicted", "data.test_labels=null")
    folds_stage.run(cfg)
    assert {s["metric"] for s in train_stage.run(cfg)} == {"map_at_k@3"}        # stage 2 picks and scores with it
    assert "map_at_k@3_mean" in rebalance_stage.run(cfg)["table"][0]             # stage 3 tunes with it
    assert infer_stage.run(cfg)["metric"] == "map_at_k@3"
    rec = ens_stage.run(cfg)
    assert rec["metric"] == "map_at_k@3"
    sub = pd.read_csv(workdir / "submissions" / "coco.csv", dtype=str)
    test = json.loads((root / "test.json").read_text())["images"]
    assert sub.columns.tolist() == ["Id", "Predicted"]
    assert sub["Id"].tolist() == [str(im["id"]) for im in test]              # the test JSON's ids, in its order
    rows = [p.split() for p in sub["Predicted"]]
    assert all(len(r) == 3 and len(set(r)) == 3 and set(r) <= {"1000", "1001", "1002", "1003"} for r in rows)
    probs = stage4_probs(cfg.run_dir, "tau")
    assert [r[0] for r in rows] == [str(1000 + i) for i in probs.argmax(1)]   # best first
    lb = build(workdir / "runs")
    assert set(lb["metric"]) == {"map_at_k@3"} and lb["cv_mean"].between(0, 1).all()
    assert read_json(cfg.run_dir.fold(0).summary)["metrics"]["map_at_k@3"] >= read_json(
        cfg.run_dir.fold(0).summary)["metrics"]["accuracy"]                  # MAP@3 >= top-1 accuracy
