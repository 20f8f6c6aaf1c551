"""One experiment's report: reports/<exp>/index.md with its tables and pictures.

Pictures (matplotlib PNGs, from the stages' files under runs/<exp>/):
  training_curves.png       loss, validation metric and lr per epoch, one line per fold (history.csv)
  confusion.png             row-normalised confusion matrix of the pooled OOF of the best row
  recall_vs_frequency.png   per-class recall against training images, joint head vs the best head
  tau_sweep.png             the held-out metric against tau, per fold (when stage 3 tuned tau)
  tta_gain.png              CV gain of each TTA view and of the policy over no TTA (stage 4)
  confidently_wrong.png     the OOF images predicted wrong with the highest confidence
  cam.png                   class activation maps over those and the most confident correct ones per class
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ...core.files import layout
from ...core.report import plots
from ...core.files.artifacts import read_json, write_text
from ...core.inputs.images import read_image
from ...core.errors import PipelineError
from ...core.files.layout import RunDir
from .leaderboard import experiment_config, experiment_rows, fold_summaries, predictions, rank, to_text
from ...core.predict.metrics import per_class_recall
from ...core.inputs.pixels import pixels

log = logging.getLogger("pipeline")

N_WRONG = 16


def write(name: str, reports: Path = layout.REPORTS, runs: Path = layout.RUNS) -> Path:
    run = RunDir.of(name, runs)
    cfg = experiment_config(run)
    summaries = fold_summaries(run, cfg.folds.n_splits)
    if not summaries:
        raise PipelineError(f"experiment '{name}': not every fold has finished stage 2; nothing to report yet")
    out = layout.experiment_report(name, reports)
    classes = read_json(run.classes)
    preds = predictions(run, cfg.folds.n_splits)
    rows = rank(pd.DataFrame(experiment_rows(run, preds)).assign(note=""))
    top = rows.iloc[0]
    best_key = (top["head"], top["tta"] == "on")
    pics = []

    histories = [pd.read_csv(run.fold(k).history) for k in range(len(summaries))]
    plots.training_curves(out / "training_curves.png", histories)
    pics.append(("Training curves", "training_curves.png"))

    p = preds[best_key]
    counts = np.mean([s["train_counts"] for s in summaries], axis=0)
    what = f"pooled OOF, head {best_key[0]}, TTA {'on' if best_key[1] else 'off'}"
    errors_md = _class_errors(out, p, classes, counts, what, pics)
    _recall_picture(out, preds, rows, classes, counts, pics)
    _tuning_pictures(cfg.eval.scorer, run, len(summaries), out, pics)
    if _confidently_wrong(cfg.folds_csv, p, classes, out / "confidently_wrong.png"):
        pics.append(("Most confidently wrong OOF images (true -> predicted, confidence)", "confidently_wrong.png"))
    cleaned_md = _cleaned(cfg.folds_csv, summaries, classes, out / "cleaned.png", pics)
    if _cams(cfg.model, pixels(cfg), cfg.folds_csv, run, summaries, p, classes, out / "cam.png"):
        pics.append(("Class activation maps of the predicted class: the most confidently wrong OOF images, then the "
                     "two most confident correct ones per class (stage-2 classifier of the image's own fold)",
                     "cam.png"))

    fold_table = pd.DataFrame([{"fold": s["fold"], "weights": s["chosen"], "epoch": s["epoch"],
                                cfg.eval.scorer: s["score"], "minutes": s["seconds"] / 60} for s in summaries])
    md = [f"# Experiment {name}", "",
          f"{cfg.model.arch} at {cfg.aug.img_size} px, {cfg.train.epochs} epochs, {len(summaries)} folds "
          f"({cfg.folds_csv.name}); metric {cfg.eval.scorer}. Config: `{run.config}`.", "",
          "## CV by head and TTA (best first)", "", "```", to_text(rows), "```", "",
          "## Stage 2 per fold", "", "```", fold_table.to_string(index=False, float_format="%.4f"), "```", ""]
    md += errors_md + cleaned_md + _prior(name)
    for title, f in pics:
        md += [f"## {title}", "", f"![{title}]({f})", ""]
    page = layout.experiment_page(name, reports)
    write_text(page, "\n".join(md))
    log.info("report of '%s': %s (%d pictures)", name, page, len(pics))
    return page


def _class_errors(out: Path, p: dict, classes: list, counts: np.ndarray, what: str, pics: list) -> list[str]:
    """The confusion matrix (a picture, added to `pics`), or with more than MAX_MATRIX classes the most-confused
    pairs and recall by frequency bin (markdown lines, returned)."""
    y, pred, C = p["y"], p["rows"].pred, len(classes)
    if C > MAX_MATRIX:  # thousands of classes: the pairs confused most often, not a C x C picture
        return [f"## Most confused pairs ({what}; {C} classes: no matrix drawn)", "", "```",
                most_confused(y, pred, classes).to_string(index=False), "```", "",
                "## Recall by training frequency", "", "```",
                recall_by_frequency(y, pred, counts).to_string(index=False, float_format="%.4f"), "```", ""]
    cm = np.zeros((C, C))
    np.add.at(cm, (y, pred), 1)
    cm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    plots.confusion(out / "confusion.png", cm, classes, f"{what} (rows: true class)")
    pics.append(("Confusion matrix (normalised per true class)", "confusion.png"))
    return []


def _recall_picture(out: Path, preds: dict, rows: pd.DataFrame, classes: list, counts: np.ndarray, pics: list) -> None:
    """Per-class recall against training frequency: the joint head and the best other head."""
    C = len(classes)
    recalls = {"joint": per_class_recall(preds[("joint", False)]["y"], preds[("joint", False)]["rows"].pred, C)}
    if (rows["head"] != "joint").any():
        h = rows[rows["head"] != "joint"].iloc[0]
        key = (h["head"], h["tta"] == "on")
        recalls[f"{key[0]}{' + TTA' if key[1] else ''}"] = per_class_recall(preds[key]["y"], preds[key]["rows"].pred, C)
    plots.recall_vs_frequency(out / "recall_vs_frequency.png", counts, recalls, classes)
    pics.append(("Per-class recall against training frequency", "recall_vs_frequency.png"))


def _tuning_pictures(metric: str, run: RunDir, n_folds: int, out: Path, pics: list) -> None:
    """Stage 3's tau sweep per fold and stage 4's CV gain of each TTA view, when those stages ran."""
    rb = [run.fold(k).rebalance_summary for k in range(n_folds)]
    if all(f.exists() for f in rb):
        tau = [read_json(f)["variants"].get("tau", {}) for f in rb]
        if all(t.get("curve") for t in tau):
            plots.sweep(out / "tau_sweep.png", [{float(a): v for a, v in t["curve"].items()} for t in tau], "tau",
                        f"{metric} on the held-out fold", [t["tau"] for t in tau])
            pics.append(("Tau sweep (dotted: the value chosen per fold)", "tau_sweep.png"))
    if run.infer_report.exists():
        r = pd.read_csv(run.infer_report)
        primary = read_json(run.infer_summary)["primary"]
        r = r[r["head"] == primary]
        base = float(r.loc[r["views"] == "no TTA", "cv_mean"].iloc[0])
        r = r[r["views"] != "no TTA"]
        plots.bars(out / "tta_gain.png", r["views"].tolist(), (r["cv_mean"] - base).tolist(),
                   f"CV {metric} gain over no TTA", f"TTA views, head {primary}")
        pics.append(("TTA gain per view and for the policy", "tta_gain.png"))


MAX_MATRIX = 60  # more classes: most-confused pairs and recall by frequency bin instead of a C x C matrix
N_PAIRS = 25


def most_confused(y: np.ndarray, pred: np.ndarray, classes: list, n: int = N_PAIRS) -> pd.DataFrame:
    """The (true, predicted) pairs of different classes seen most often, with their share of the true class."""
    wrong = y != pred
    pairs = pd.DataFrame({"true": y[wrong], "predicted": pred[wrong]}).value_counts().head(n).reset_index()
    support = np.bincount(y, minlength=len(classes))
    return pd.DataFrame({"true": [classes[i] for i in pairs["true"]], "predicted": [classes[i] for i in pairs["predicted"]],
                         "images": pairs["count"].values,
                         "share_of_true": pairs["count"].values / support[pairs["true"].values]})


def recall_by_frequency(y: np.ndarray, pred: np.ndarray, counts: np.ndarray) -> pd.DataFrame:
    """Mean per-class recall of classes grouped by training images (bins 1, 2-4, 5-19, 20-99, 100+)."""
    rec = per_class_recall(y, pred, len(counts))
    edges = [(1, 1), (2, 4), (5, 19), (20, 99), (100, np.inf)]
    out = []
    for lo, hi in edges:
        m = (counts >= lo) & (counts <= hi) & np.isfinite(rec)
        if m.any():
            out.append({"train_images": f"{lo}" if lo == hi else (f"{lo}+" if hi == np.inf else f"{lo}-{hi}"),
                        "classes": int(m.sum()), "mean_recall": float(rec[m].mean())})
    return pd.DataFrame(out)


def _confidently_wrong(folds_csv: Path, pred: dict, classes: list, path: Path) -> bool:
    rows, y = pred["rows"], pred["y"]
    wrong = np.flatnonzero(rows.pred != y)
    if not len(wrong) or not folds_csv.exists():
        return False
    wrong = wrong[np.argsort(-rows.conf[wrong])][:N_WRONG]
    paths = pd.read_csv(folds_csv, dtype=str, keep_default_na=False).set_index("id")["path"]
    images, captions = [], []
    for i in wrong:
        image_id = str(pred["ids"][i])
        try:
            images.append(read_image(paths[image_id]))
        except (KeyError, PipelineError, OSError):
            continue  # the train images are not at hand (e.g. a copied run folder)
        captions.append(f"{image_id}\n{classes[y[i]]} -> {classes[rows.pred[i]]} ({rows.conf[i]:.2f})")
    if not images:
        return False
    plots.contact_sheet(path, images, captions, "most confidently wrong OOF predictions")
    return True


def _prior(name: str) -> list[str]:
    """ensemble.prior on this experiment's submission: the estimate's verdict and stage 5's shift report."""
    path = layout.submission_record(name)
    rec = read_json(path).get("prior") if path.exists() else None
    if not rec:
        return []
    verdict = ("applied" if rec["applied"] else "not applied: no shift beyond noise")
    md = ["## Test-time prior (ensemble.prior)", "",
          f"`{rec['method']}` on the test rows of submissions/{name}.csv: {verdict} (likelihood-ratio p = "
          f"{rec['p_value']:.3g}, L1 {rec['l1_from_train']:.3f} from the train prior; private score without it: "
          f"{rec.get('private_without')}). Measured on each fold's OOF rows re-sampled to a shifted prior (mean over "
          f"folds; gains: positive is better):", "", "```",
          pd.DataFrame(rec["shifts"]).to_string(index=False, float_format="%.4f"), "```", ""]
    return md


N_CLEANED = 40  # flagged rows listed and shown on the page (every one is in the folds' summary.json)


def _cleaned(folds_csv: Path, summaries: list[dict], classes: list, path: Path, pics: list) -> list[str]:
    """train.clean_labels: per fold, how many training rows were flagged and what was done; the flagged rows (label
    -> the class the inner cross-validation predicted), listed and shown with their images."""
    folds = [s for s in summaries if s.get("cleaned")]
    if not folds:
        return []
    md = ["## Label cleaning (train.clean_labels)", "",
          "Training rows flagged by confident learning on an inner cross-validation of each fold's training rows "
          "(never its held-out rows); most confidently wrong first.", ""]
    md += [f"- fold {s['fold']}: {s['cleaned']['flagged']} of {s['cleaned']['of']} training rows "
           f"{'dropped' if s['cleaned']['action'] == 'drop' else 'relabelled'}" for s in folds]
    rows = [(s["fold"], r) for s in folds for r in s["cleaned"]["rows"]][:N_CLEANED]
    table = pd.DataFrame([{"fold": k, "id": r["id"], "label": classes[r["label"]], "predicted": classes[r["predicted"]]}
                          for k, r in rows])
    md += ["", "```", table.to_string(index=False), "```", ""]
    paths = pd.read_csv(folds_csv, dtype=str, keep_default_na=False).set_index("id")["path"] \
        if folds_csv.exists() else {}
    images, captions = [], []
    for k, r in rows:
        try:
            images.append(read_image(paths[r["id"]]))
        except (KeyError, PipelineError, OSError):
            continue  # the train images are not at hand (e.g. a copied run folder)
        captions.append(f"{r['id']}\n{classes[r['label']]} -> {classes[r['predicted']]}")
    if images:
        plots.contact_sheet(path, images, captions, "rows flagged by label cleaning (label -> predicted)")
        pics.append(("Rows flagged by label cleaning (label -> predicted)", path.name))
    return md


N_CAM_WRONG, N_CAM_PER_CLASS, N_CAM_CLASSES = 8, 2, 30


def _cams(model_cfg, px, folds_csv: Path, run: RunDir, summaries: list[dict], pred: dict, classes: list,
          path: Path) -> bool:
    """cam.png: class activation maps (models.class_activation_maps) over OOF images, each from the fold model
    that held it out, for the class it predicted. Skipped (False) without the train images or a CNN map."""
    import torch

    from ...core.nets import models
    from ...core.inputs.augment import valid_transform

    y, top, conf = pred["y"], pred["rows"].pred, pred["rows"].conf
    wrong = np.flatnonzero(top != y)
    picks = list(wrong[np.argsort(-conf[wrong])][:N_CAM_WRONG])
    # correct examples of at most N_CAM_CLASSES classes (the most frequent ones when there are more)
    shown = np.argsort(-np.bincount(y, minlength=len(classes)), kind="stable")[:N_CAM_CLASSES]
    for c in sorted(shown):
        right = np.flatnonzero((top == y) & (y == c))
        picks += list(right[np.argsort(-conf[right])][:N_CAM_PER_CLASS])
    if not picks or not folds_csv.exists():
        return False
    paths = pd.read_csv(folds_csv, dtype=str, keep_default_na=False).set_index("id")["path"]
    tf = valid_transform(px)
    images, captions, loaded = [], [], {}
    try:
        for i in picks:
            k = int(pred["fold"][i])
            if k not in loaded:
                model = models.load_trained(model_cfg, run.fold(k).weights, len(classes)).eval()
                loaded[k] = (model, models.Normalize(summaries[k]["mean"], summaries[k]["std"]))
            model, norm = loaded[k]
            image_id = str(pred["ids"][i])
            img = tf(image=read_image(paths[image_id]))["image"]
            x = norm(torch.from_numpy(np.ascontiguousarray(img))[None])
            cam = models.class_activation_maps(model, x, torch.tensor([int(top[i])]))[0].numpy()
            images.append(plots.cam_overlay(img, cam))
            mark = "" if top[i] == y[i] else "WRONG "
            captions.append(f"{mark}{image_id}\n{classes[y[i]]} -> {classes[top[i]]} ({conf[i]:.2f})")
    except (KeyError, PipelineError, OSError) as e:
        log.info("report: no class activation maps (%s)", e)
        return False
    plots.contact_sheet(path, images, captions, "class activation maps (predicted class)", cols=6)
    return True
