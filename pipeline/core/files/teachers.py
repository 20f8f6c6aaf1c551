"""A teacher's files (`train.pseudo`, `train.distill`): the ensemble or experiment it is, the stage-4 summaries it
reads, and its record, what a student's targets are made from (the units' stage-2 records hold it). Read by
core/files/provenance for the records and by core/engine/teacher, which computes the targets."""
from __future__ import annotations

from dataclasses import dataclass

from . import layout
from .artifacts import read_json, sha256_obj
from ..errors import PipelineError
from ..predict.submission import Member


@dataclass
class Teacher:
    name: str
    kind: str  # "ensemble" or "experiment"
    method: str
    weights: dict[str, float]  # candidate -> weight, fit on every OOF row (the leaky shortcut and test means)
    fold_weights: list[dict[str, float]] | None  # per fold: fit without that fold (None: fixed weights)
    stage4: dict[str, dict]  # experiment -> its stage-4 summary

    def weights_for(self, k: int) -> dict[str, float]:
        return self.fold_weights[k] if self.fold_weights else self.weights

    @property
    def candidates(self) -> list[str]:
        names = list(self.weights)
        for fw in self.fold_weights or []:
            names += [n for n in fw if n not in names]
        return names


def load_teacher(name: str) -> Teacher:
    """The ensemble of that name, else the experiment (its stage-4 primary head); refused when neither is finished."""
    rec_path = layout.submission_record(name)
    if rec_path.exists():
        rec = read_json(rec_path)
        weights, fold_weights, kind, method = rec["weights"], rec.get("fold_weights"), "ensemble", rec["method"]
        if method in ("weighted", "hill_climb") and not fold_weights:
            raise PipelineError(f"teacher '{name}': {rec_path} has no per-fold weights (made before they were kept); "
                                f"re-run ./run.sh ensemble for it")
    elif layout.RunDir.of(name).infer_summary.exists():
        s4 = read_json(layout.RunDir.of(name).infer_summary)
        weights, fold_weights, kind, method = {f"{name}:{s4['primary']}": 1.0}, None, "experiment", "mean"
    else:
        raise PipelineError(f"teacher '{name}': neither {rec_path} (an ensemble) nor "
                            f"{layout.RunDir.of(name).infer_summary} (an experiment's stage 4) exists; run "
                            f"./run.sh all for it first")
    t = Teacher(name, kind, method, weights, fold_weights, {})
    for c in t.candidates:
        exp = Member.parse(c, f"teacher '{name}': member").exp
        path = layout.RunDir.of(exp).infer_summary
        if not path.exists():
            raise PipelineError(f"teacher '{name}': member '{exp}' has no stage-4 output ({path})")
        t.stage4[exp] = read_json(path)
    return t


def teacher_record(t: Teacher, k_folds: int) -> dict:
    """What a student's targets from this teacher depend on (a change makes the student's stage 2 stale)."""
    members = {}
    for exp, s4 in t.stage4.items():
        run = layout.RunDir.of(exp)
        heads = {m.head for m in map(Member.parse, t.candidates) if m.exp == exp}
        choices = [read_json(run.fold(k).rebalance_summary)["variants"] if run.fold(k).rebalance_summary.exists()
                   else None for k in range(k_folds)] if heads - {"joint"} else None
        members[exp] = sha256_obj({"stage4": s4["made_from"], "fixres": s4.get("fixres_files"), "policy": s4["policy"],
                                   "searched": s4.get("searched"), "merge": s4["merge"], "stage3": choices,
                                   **({"fold_policies": s4["fold_policies"]} if s4.get("fold_policies") else {})})
    return {"name": t.name, "kind": t.kind, "method": t.method, "weights": t.weights, "fold_weights": t.fold_weights,
            "members": members}


def check_folds(t: Teacher, folds_sha: str) -> None:
    """The student's fold k may only learn from the teacher's fold-k models if both use the same folds."""
    for exp in t.stage4:
        stage2 = layout.RunDir.of(exp).fold(0).summary
        theirs = read_json(stage2)["made_from"]["folds_file"] if stage2.exists() else None
        if theirs != folds_sha:
            raise PipelineError(f"teacher '{t.name}': member '{exp}' was trained on another folds file than this "
                                f"experiment ({stage2}); fold k's targets must come from models that never saw fold k, so "
                                f"student and teacher need the same folds (set folds.name, or retrain one of them)")


# ----------------------------------------------------------------------------- fold-k predictions
