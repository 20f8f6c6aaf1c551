"""The on-disk layout: the one place where every path under folds/, runs/, submissions/ and reports/
is defined. README.md's layout table reads like this module.

    folds/<name>.csv, <name>.json               stage 1
    runs/<exp>/config.yaml, classes.json        stage 2 (the resolved config, the label encoding)
    runs/<exp>/fold<k>/...                      stage 2 per fold      (FoldDir)
    runs/<exp>/fold<k>/rebalance/...            stage 3 per fold      (FoldDir.rebalance*)
    runs/<exp>/rebalance/...                    stage 3 report        (RunDir.rebalance*)
    runs/<exp>/full/...                         stages 2-3 of the full-data model (RunDir.full, train.full_fit)
    runs/<exp>/infer/...                        stage 4               (RunDir.infer*, RunDir.fixres*)
    runs/<exp>/logs/<stage>-<time>.log          what a stage logged   (RunDir.log)
    runs/.cache/                                decoded image caches (shared by experiments)
    runs/.stats/<digest>.json                   the image file lists behind records (image_snapshot)
    runs/.sweeps/<sweep>/...                    a sweep's study, trials and their configs (SweepDir)
    submissions/<name>.csv, <name>.json         stage 5
    reports/leaderboard.{csv,md}, reports/<exp>/   tools
    exports/<name>/...                          export bundles        (BundleDir)

Paths are relative to the project folder (the current directory); tools that read another tree
pass its runs/ folder.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import PipelineError

FOLDS = Path("folds")
RUNS = Path("runs")
SUBMISSIONS = Path("submissions")
REPORTS = Path("reports")
EXPORTS = Path("exports")
CACHE = RUNS / ".cache"
STATS = RUNS / ".stats"
SWEEPS = RUNS / ".sweeps"
FULL_FIT = -1  # the index that stands for the full-data model (train.full_fit) where a fold index is expected


# ----------------------------------------------------------------------------- names
_BAD_NAME = re.compile(r"[/\\:\x00-\x1f\x7f]")


def check_name(name: str, what: str = "name") -> str:
    """A name that becomes a file or folder name (experiment, ensemble.name, folds.name, a report or
    export name): one plain path component, so nothing is ever written outside its folder. The one
    place this rule lives; every path function below applies it."""
    if (not isinstance(name, str) or not name or len(name) > 128 or name.startswith((".", "-", "~"))
            or name != name.strip() or _BAD_NAME.search(name)):
        raise PipelineError(f"{what} {name!r} is not a plain name: use 1-128 characters without '/', '\\', ':' "
                            f"or control characters, not starting with '.', '-' or '~' or with spaces")
    return name


# ----------------------------------------------------------------------------- stage 1
def folds_csv(name: str) -> Path:
    """The train table plus its `fold` column."""
    return FOLDS / f"{check_name(name, 'folds name')}.csv"


def folds_record(name: str) -> Path:
    """The label encoding and what the folds were made from."""
    return FOLDS / f"{check_name(name, 'folds name')}.json"


# ----------------------------------------------------------------------------- stages 2-3, per fold
@dataclass(frozen=True)
class FoldDir:
    dir: Path

    # stage 2
    @property
    def summary(self) -> Path:  # written last: the fold is complete
        return self.dir / "summary.json"

    @property
    def weights(self) -> Path:  # the chosen weights (raw or EMA)
        return self.dir / "model.safetensors"

    @property
    def oof(self) -> Path:  # held-out logits of the chosen weights
        return self.dir / "oof.npz"

    @property
    def history(self) -> Path:
        return self.dir / "history.csv"

    @property
    def checkpoint(self) -> Path:  # the resume state
        return self.dir / "last.pt"

    def best(self, source: str) -> Path:  # best weights of one source: raw or ema
        return self.dir / f"best_{source}.safetensors"

    def oof_of(self, source: str) -> Path:
        return self.dir / f"oof_{source}.npz"

    @property
    def teacher_targets(self) -> Path:  # train.pseudo / train.distill: the teacher's fold-k probabilities
        return self.dir / "teacher.npz"

    @property
    def teacher_meta(self) -> Path:  # what they were made from (written after them)
        return self.dir / "teacher.json"

    # stage 3
    @property
    def rebalance(self) -> Path:
        return self.dir / "rebalance"

    @property
    def features(self) -> Path:
        return self.rebalance / "features.npz"

    @property
    def features_meta(self) -> Path:
        return self.rebalance / "features.json"

    def head(self, variant: str) -> Path:
        return self.rebalance / "heads" / f"{variant}.safetensors"

    def head_oof(self, variant: str) -> Path:  # cross-fitted held-out logits (+ each row's inner split)
        return self.rebalance / f"oof_{variant}.npz"

    def inner_head(self, variant: str, j: int) -> Path:  # the head chosen without inner split j: for its rows
        return self.rebalance / "heads" / f"{variant}.inner{j}.safetensors"

    def inner_heads(self, variant: str) -> list[Path]:  # every inner split's head of a variant, in split order
        return sorted((self.rebalance / "heads").glob(f"{variant}.inner*.safetensors"),
                      key=lambda p: int(p.name.rsplit(".inner", 1)[1].split(".")[0]))

    @property
    def rebalance_summary(self) -> Path:  # written last
        return self.rebalance / "summary.json"

    @property
    def name(self) -> str:  # fold<k>, or full
        return self.dir.name


# ----------------------------------------------------------------------------- one experiment
@dataclass(frozen=True)
class RunDir:
    dir: Path

    @classmethod
    def of(cls, experiment: str, runs: Path = RUNS) -> "RunDir":
        return cls(Path(runs) / check_name(experiment, "experiment"))

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def config(self) -> Path:  # the fully resolved config
        return self.dir / "config.yaml"

    @property
    def classes(self) -> Path:  # the label encoding
        return self.dir / "classes.json"

    @property
    def tracking(self) -> Path:  # default MLflow / TensorBoard / W&B folder
        return self.dir / "tracking"

    @property
    def logs(self) -> Path:  # what each stage logged, one file per run of a stage
        return self.dir / "logs"

    def log(self, stage: str, stamp: str) -> Path:
        return self.logs / f"{stage}-{stamp}.log"

    def fold(self, k: int) -> FoldDir:
        return FoldDir(self.dir / f"fold{k}")

    @property
    def full(self) -> FoldDir:  # train.full_fit: the model of every row (stages 2 and 3 as for a fold, no OOF)
        return FoldDir(self.dir / "full")

    def unit(self, k: int) -> FoldDir:  # fold k, or the full-data model for k = FULL_FIT
        return self.full if k == FULL_FIT else self.fold(k)

    # stage 3 report
    @property
    def rebalance(self) -> Path:
        return self.dir / "rebalance"

    @property
    def probe_features(self) -> Path:  # rebalance.probe: the pretrained backbone's features of every train row
        return self.rebalance / "probe_features.npz"

    @property
    def probe_features_meta(self) -> Path:  # what they were made from (written after them)
        return self.rebalance / "probe_features.json"

    @property
    def rebalance_summary(self) -> Path:
        return self.rebalance / "summary.json"

    @property
    def rebalance_csv(self) -> Path:
        return self.rebalance / "report.csv"

    @property
    def rebalance_md(self) -> Path:
        return self.rebalance / "report.md"

    # stage 4
    @property
    def infer(self) -> Path:
        return self.dir / "infer"

    @property
    def infer_summary(self) -> Path:  # written last
        return self.infer / "summary.json"

    @property
    def infer_report(self) -> Path:
        return self.infer / "report.csv"

    @property
    def infer_scores(self) -> Path:  # per head: the held-out rows' per-row scores without TTA and with the policy
        return self.infer / "scores.npz"

    @property
    def infer_rows(self) -> Path:  # the rows stage 4 predicted: test ids; held-out ids, labels, folds; classes
        return self.infer / "rows.npz"

    @property
    def infer_features_dir(self) -> Path:
        return self.infer / "features"

    def infer_legacy(self) -> list[Path]:  # stage 4's per-head folders of logits (<head>/test.npz), before #35
        return sorted(p.parent for p in self.infer.glob("*/test.npz"))

    def infer_features(self, backbone: str, part: str | int) -> Path:
        """Stage 4's pooled features of one backbone (fold<k>, full, fold<k>.fixres, pretrained, fold<k>.wise<a>),
        V x N x D: of the test images (`part` "test"), or of fold k's held-out rows (`part` k)."""
        return self.infer_features_dir / backbone / ("test.npy" if part == "test" else f"held{int(part)}.npy")

    @staticmethod
    def feature_digests(features: Path) -> Path:
        """The sidecar of a stage-4 feature file: its rows' digests per view (V x N float64; files/featurefile)."""
        return Path(features).with_suffix(".digest.npy")

    def fixres(self, unit: str) -> Path:  # infer.fixres: fold<k> or full weights with BN + classifier tuned
        return self.infer / "fixres" / f"{unit}.safetensors"

    def fixres_meta(self, unit: str) -> Path:  # what they were made from (written after the weights)
        return self.infer / "fixres" / f"{unit}.json"


def image_snapshot(digest: str) -> Path:
    """The per-file list (path, size, mtime or sha256) behind an image digest of a record."""
    return STATS / f"{digest}.json"


def experiments(runs: Path = RUNS) -> list[str]:
    """Names of the experiment folders under runs/ (those with a resolved config)."""
    runs = Path(runs)
    return sorted(d.name for d in runs.iterdir() if RunDir(d).config.exists()) if runs.is_dir() else []


# ----------------------------------------------------------------------------- sweeps (tools/sweep.py)
@dataclass(frozen=True)
class SweepDir:
    dir: Path

    @classmethod
    def of(cls, name: str, runs: Path = RUNS) -> "SweepDir":
        return cls(Path(runs) / SWEEPS.name / check_name(name, "sweep name"))

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def journal(self) -> Path:  # the Optuna study (journal storage)
        return self.dir / "journal.log"

    @property
    def lock(self) -> Path:  # held while a worker counts the trials and asks for the next
        return self.dir / "ask.lock"

    @property
    def trials(self) -> Path:  # every trial: experiment, state, parameters, per-fold CV; the nested selection
        return self.dir / "trials.json"

    @property
    def best(self) -> Path:  # the winner's config (sweep --finish)
        return self.dir / "best.yaml"

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    def trial_config(self, experiment: str) -> Path:  # a trial's resolved config
        return self.dir / "trials" / f"{check_name(experiment, 'experiment')}.yaml"

    def trial_log(self, experiment: str) -> Path:  # what a trial's process printed
        return self.logs / f"{check_name(experiment, 'experiment')}.log"


def sweeps(runs: Path = RUNS) -> list[SweepDir]:
    """Every sweep under runs/.sweeps/ with a trials record."""
    d = Path(runs) / SWEEPS.name
    return [SweepDir(x) for x in sorted(d.iterdir()) if (x / "trials.json").exists()] if d.is_dir() else []


def sweep_report(name: str, reports: Path = REPORTS) -> Path:
    """reports/<sweep>/: the sweep page and its pictures."""
    return Path(reports) / check_name(name, "sweep name")


# ----------------------------------------------------------------------------- stage 5
def submission_csv(name: str, submissions: Path = SUBMISSIONS) -> Path:
    return Path(submissions) / f"{check_name(name, 'ensemble name')}.csv"


def submission_record(name: str, submissions: Path = SUBMISSIONS) -> Path:
    return Path(submissions) / f"{check_name(name, 'ensemble name')}.json"


# ----------------------------------------------------------------------------- tools
def leaderboard_csv(reports: Path = REPORTS) -> Path:
    return Path(reports) / "leaderboard.csv"


def leaderboard_md(reports: Path = REPORTS) -> Path:
    return Path(reports) / "leaderboard.md"


def experiment_report(experiment: str, reports: Path = REPORTS) -> Path:
    """reports/<exp>/: index.md and its pictures (named by the page that draws them)."""
    return Path(reports) / check_name(experiment, "experiment")


def experiment_page(experiment: str, reports: Path = REPORTS) -> Path:
    return experiment_report(experiment, reports) / "index.md"


# ----------------------------------------------------------------------------- export bundles
def export_dir(name: str, exports: Path = EXPORTS) -> Path:
    """The default folder of `./run.sh export` for an ensemble (or experiment) name."""
    return Path(exports) / check_name(name, "export name")


@dataclass(frozen=True)
class BundleMember:
    """members/<member>/ of a bundle: one experiment with one head."""
    dir: Path

    @property
    def config(self) -> Path:  # the config sections inference reads, resolved
        return self.dir / "config.yaml"

    @property
    def info(self) -> Path:  # classes, head, TTA policy, per-fold normalisation, expected CV
        return self.dir / "member.json"

    def unit(self, k: int) -> Path:  # fold<k>/, or full/ for the full-data model (k = FULL_FIT)
        return self.dir / ("full" if k == FULL_FIT else f"fold{k}")

    def weights(self, k: int) -> Path:  # a plain timm checkpoint (the head folded in where it is linear)
        return self.unit(k) / "model.safetensors"

    def fixres_weights(self, k: int) -> Path:  # the FixRes-tuned copy (infer.fixres), head folded in the same way
        return self.unit(k) / "fixres.safetensors"

    def head(self, k: int) -> Path:  # only for heads that are not a linear layer (NCM, kNN)
        return self.unit(k) / "head.safetensors"

    def onnx(self, k: int) -> Path:  # backbone + head, behind `export --onnx`
        return self.unit(k) / "model.onnx"


@dataclass(frozen=True)
class BundleDir:
    """What `./run.sh export` writes and `./run.sh predict` reads; every file is listed, with its
    sha256, in the manifest."""
    dir: Path

    @property
    def manifest(self) -> Path:  # written last
        return self.dir / "manifest.json"

    @property
    def readme(self) -> Path:
        return self.dir / "README.md"

    @property
    def wheels(self) -> Path:  # a wheel of this package
        return self.dir / "wheels"

    def member(self, name: str) -> BundleMember:
        return BundleMember(self.dir / "members" / name.replace(":", "--"))


def lr_find_csv(experiment: str, reports: Path = REPORTS) -> Path:
    """`./run.sh lr-find`: learning rate, loss and smoothed loss per step."""
    return experiment_report(experiment, reports) / "lr_find.csv"


def lr_find_png(experiment: str, reports: Path = REPORTS) -> Path:
    return experiment_report(experiment, reports) / "lr_find.png"


# ----------------------------------------------------------------------------- weights from elsewhere
def weights_record(weights: str | Path) -> Path:
    """The record `weights import` writes beside a converted weights file (source, sha256, mapping, the
    weights' pretrained config): <file without suffix>.json, e.g. weights/lite0.safetensors -> weights/lite0.json."""
    return Path(weights).with_suffix(".json")

