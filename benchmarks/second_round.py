"""Benchmark of the second-round techniques (not a test): prints the table docs/benchmarks/second_round.md quotes.

    ./run.sh all                                   # the demo, once (its two experiments and ensemble)
    python benchmarks/second_round.py [--config configs/demo.yaml] [--student-arch test_resnet]

1. Ensemble selection: the demo's members combined by `mean` (the demo's own method) and by `hill_climb`
   (honest CV: each fold scored with the multiset climbed on the other folds), CV and private score.
2. A small student (`--student-arch`, default timm's tiny `test_resnet`, no TTA) trained alone, distilled
   from the demo ensemble (honest: fold k's targets from the teacher's fold-k models), distilled with
   pseudo-labelled test images too, and distilled with the LEAKY shortcut (train rows' OOF probabilities),
   each with its CV, private score, parameter count and test-time images/s against the teacher's.
Writes runs/sr-*/ and submissions/sr-*.{csv,json} in the project folder.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _stages import stages_1_to_4  # noqa: E402
from pipeline.core.files import layout
from pipeline.core.nets import models  # noqa: E402
from pipeline.core.files.artifacts import read_json  # noqa: E402
from pipeline.core.config import load_config  # noqa: E402
from pipeline.stages import ensemble  # noqa: E402
from pipeline.tools.reports import leaderboard  # noqa: E402

STUDENTS = {  # name: overrides (the teacher is the config's ensemble)
    "alone": [],
    "distilled": ["train.distill.teacher={ens}", "train.distill.alpha=0.7", "train.distill.temperature=2"],
    "distilled+pseudo": ["train.distill.teacher={ens}", "train.distill.alpha=0.7", "train.distill.temperature=2",
                         "train.pseudo.teacher={ens}", "train.pseudo.threshold=0.9", "train.pseudo.weight=0.5"],
    "distilled-LEAKY": ["train.distill.teacher={ens}", "train.distill.alpha=0.7", "train.distill.temperature=2",
                        "train.distill.leaky_oof=true"],
}


def ensemble_row(name: str) -> dict:
    rec = read_json(layout.submission_record(name))
    row = next(r for r in rec["table"] if str(r["member"]).startswith("ensemble"))
    return {"cv": row["cv_mean"], "private": rec.get("private"), "rec": rec}


def n_params(cfg) -> int:
    return sum(p.numel() for p in models.create_model(cfg.model, 10, pretrained=False).parameters())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--student-arch", default="test_resnet")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    base = load_config(args.config)
    ens_name = base.ensemble.name or base.experiment

    # 1. mean vs hill climbing over the same members
    mean = ensemble_row(ens_name)
    hc_cfg = load_config(args.config, ["ensemble.method=hill_climb", "ensemble.name=sr-hill-climb",
                                       "ensemble.weight_metric=log_loss"])
    hc_rec = ensemble.run(hc_cfg)
    hc = ensemble_row("sr-hill-climb")
    print(f"ensemble mean        CV {mean['cv']:.4f}  private {mean['private']:.4f}")
    print(f"ensemble hill_climb  CV {hc['cv']:.4f}  private {hc['private']:.4f}  (gain over the members' mean on OOF "
          f"{hc_rec['hill_climb']['cv_gain_over_mean']:+.4f}; chose {hc_rec['hill_climb']['chosen']})", flush=True)

    # 2. students
    teacher_members = [m.split(":")[0] for m in mean["rec"]["members"]]
    t_params = sum(n_params(load_config(layout.RunDir.of(m).config)) for m in teacher_members)
    t_rate = 1 / sum(1 / read_json(layout.RunDir.of(m).infer_summary)["images_per_s"] for m in teacher_members)
    rows = []
    for name, extra in STUDENTS.items():
        exp = f"sr-student-{name}"
        over = [f"experiment={exp}", "run_also=[]", "ensemble.members=[]", f"model.arch={args.student_arch}",
                "model.pool=avg", "infer.views=[orig]", "infer.scales=[1.0]", "infer.search=false",
                *[e.format(ens=ens_name) for e in extra]]
        cfg = load_config(args.config, over)
        t0 = time.perf_counter()
        s4 = stages_1_to_4(cfg)
        best = s4["heads"][0]
        lb = {(r["head"], r["tta"]): r for r in leaderboard.experiment_rows(cfg.run_dir)}
        r = lb.get((best, "on")) or lb[(best, "off")]
        j = lb[("joint", "off")]
        rows.append({"student": name, "cv_joint": j["cv_mean"], "private_joint": j["private"], "head": best,
                     "cv_head": r["cv_mean"], "private_head": r["private"], "params": n_params(cfg),
                     "rate": s4["images_per_s"], "minutes": (time.perf_counter() - t0) / 60})
        x = rows[-1]
        print(f"student {name:18s} CV joint {x['cv_joint']:.4f} private joint {x['private_joint']:.4f}  "
              f"{best} CV {x['cv_head']:.4f} private {x['private_head']:.4f}  {x['params'] / 1e6:.2f} M params  "
              f"{x['rate']:.0f} view-img/s  {x['minutes']:.1f} min", flush=True)
    print(f"\nteacher ({ens_name}: {' + '.join(teacher_members)}, with their TTA): CV {mean['cv']:.4f}, private "
          f"{mean['private']:.4f}, {t_params / 1e6:.2f} M params, about {t_rate:.0f} view-img/s at stage 4")
    print("\n| model | CV joint | private joint | CV best head | private best head | params | stage-4 view-img/s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| ensemble `mean` ({' + '.join(teacher_members)}) | | | {mean['cv']:.4f} | {mean['private']:.4f} | "
          f"{t_params / 1e6:.2f} M | {t_rate:.0f} |")
    print(f"| ensemble `hill_climb` | | | {hc['cv']:.4f} | {hc['private']:.4f} | | |")
    for x in rows:
        print(f"| {args.student_arch} {x['student']} | {x['cv_joint']:.4f} | {x['private_joint']:.4f} | "
              f"{x['cv_head']:.4f} ({x['head']}) | {x['private_head']:.4f} | {x['params'] / 1e6:.2f} M | "
              f"{x['rate']:.0f} |")


if __name__ == "__main__":
    main()
