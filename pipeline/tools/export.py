"""`./run.sh export`: a self-contained inference bundle for a Kaggle code competition (or any offline
machine), made from an ensemble's finished stages 2-5.

Usage:   ./run.sh export [--config FILE] [--out DIR] [--zip] [--onnx]
Input:   submissions/<name>.json (stage 5: members, method, weights, CV), and per member
         runs/<exp>/config.yaml, fold<k>/model.safetensors + summary.json, the stage-3 head in use,
         runs/<exp>/infer/summary.json (the TTA policy and merge rule)
Output:  exports/<name>/ (or --out):
           manifest.json                  written last: every file with its sha256 and size, the
                                          versions it was made with, method, weights, expected CV
           README.md                      the two lines to paste into a notebook
           wheels/pipeline-*.whl          this package
           members/<exp>--<head>/config.yaml, member.json
           members/<exp>--<head>/fold<k>/model.safetensors   a plain timm checkpoint per fold, the
                                          stage-3 head folded into its classifier where it is linear
           members/<exp>--<head>/fold<k>/fixres.safetensors  with infer.fixres: the FixRes-tuned copy
           members/<exp>--<head>/full/...                  with train.full_fit: the full-data model, alike
           members/<exp>--<head>/fold<k>/head.safetensors    only for a normalised head (NCM)
           members/<exp>--<head>/fold<k>/model.onnx          with --onnx: backbone + head
         and with --zip the same as <out>.zip. Training-only files (checkpoints, OOF, features, image
         caches) never go in. The bundle is built in a temporary folder and renamed into place.
"""
from __future__ import annotations

import datetime as dt
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import yaml

from .. import __version__
from ..core.files import bundle as bundle_io
from ..core.files import layout
from ..core.nets import models
from ..core.nets.families import family_of
from ..core.files.artifacts import read_json, sha256_file, write_json, write_text

from ..core.config import (MIX, Config, EnsembleCfg, ModelCfg, keys_without_output, load_config, off_backbone,
                           wise_alpha_of)
from ..core.errors import PipelineError
from ..core.nets.heads import Head
from ..core.predict.inference import joint_head, parse_view
from ..core.files.provenance import environment
from ..core.predict.stored import mix_shares
from ..core.predict.submission import Member, parse_members
from ..core.predict.tta import BASELINE
from ..core.inputs.pixels import pixels

log = logging.getLogger("pipeline")

INFERENCE_TRAIN_KEYS = ("amp", "channels_last", "workers")  # the train settings inference reads
DATA_KEYS = ("id_col", "label_col", "image_ext", "check_images")


# ----------------------------------------------------------------------------- checks
def stage5_record(e: EnsembleCfg, experiment: str) -> tuple[str, dict]:
    """The finished ensemble's name and record, refused when missing or made from other members than `e` names."""
    name = e.name or experiment
    path = layout.submission_record(name)
    if not path.exists():
        raise PipelineError(f"{path} not found: export packs a finished ensemble; run ./run.sh ensemble "
                            f"(or ./run.sh all) for '{name}' first")
    rec = read_json(path)
    want = parse_members(e.members, experiment)
    have = [Member.parse(m, f"{path}: member") for m in rec["members"]]
    if rec["method"] == "hill_climb":  # the candidates it kept: heads and policies of the configured experiments
        wrong = not {h.exp for h in have} <= {w.exp for w in want}
    else:  # a member named with its head (and :plain) must be exactly that one
        wrong = [w.exp for w in want] != [h.exp for h in have] or any(
            w.head and w != h for w, h in zip(want, have))
    want, have = [str(w) for w in want], [str(h) for h in have]
    if wrong:
        raise PipelineError(f"{path} was made from members {have}, the config names {want}: re-run "
                            f"./run.sh ensemble")
    return name, rec


def test_variant(s4: dict, head: str) -> str:
    """The stage-3 variant behind a head's test predictions: for `best`, the variant best on all folds."""
    return s4["best"]["all"] if head == "best" else head


def test_parts(s4: dict, head: str) -> list[str]:
    """The stage-3 variants whose logits make a head's test predictions: one, or the mix head's fine-tuned and probe
    parts (each chosen on all folds)."""
    variant = test_variant(s4, head)
    return list(s4["mix"]["all"]) if variant == MIX else [variant]


def current_member(name: str, rec: dict) -> tuple[layout.RunDir, dict, str]:
    """The member's run folder and stage-4 summary, refused unless stage 5 was made from exactly this
    stage-4 output and the weights and heads on disk are the ones stage 4 predicted with."""
    exp, head, _ = Member.parse(name)  # `exp:head:plain`: the member's no-TTA view
    run = layout.RunDir.of(exp)
    if not run.infer_summary.exists():
        raise PipelineError(f"{run.infer_summary} not found: run ./run.sh infer for '{exp}'")
    s4 = read_json(run.infer_summary)
    made_then = [v for k, v in rec["made_from"]["members"].items() if Member.parse(k).exp == exp]
    if [s4["made_from"]] != made_then:
        raise PipelineError(f"the ensemble was made before stage 4 of '{exp}' last ran ({run.infer_summary}): "
                            f"re-run ./run.sh ensemble (or ./run.sh all) before exporting")
    made = s4["made_from"]
    parts = test_parts(s4, head)  # the head files behind the test predictions
    for files in parts:
        if off_backbone(files):  # probe / WiSE-FT heads: the bundle holds the backbone they ran on, made again
            _check_pretrained(run, name, files)
    for k, want in enumerate(made["weights"]):
        if sha256_file(run.fold(k).weights) != want:
            raise PipelineError(f"{run.fold(k).weights} changed after stage 4 predicted with it: re-run "
                                f"./run.sh all before exporting")
    for files in parts:
        for k, want in enumerate(made["head_files"].get(files, [])):
            if sha256_file(run.fold(k).head(files)) != want:
                raise PipelineError(f"{run.fold(k).head(files)} changed after stage 4 predicted with it: re-run "
                                    f"./run.sh all before exporting")
    full = made.get("full")
    if full and s4.get("full_fit_weight", 0) > 0:
        files = parts[0]  # the fine-tuned part (the full-data model has no probe heads)
        for path, want in [(run.full.weights, full["weights"])] + (
                [(run.full.head(files), full["head_files"][files])] if files != "joint" else []):
            if not path.exists() or sha256_file(path) != want:
                raise PipelineError(f"{path} changed after stage 4 predicted with it: re-run ./run.sh all before "
                                    f"exporting")
    for unit, want in s4.get("fixres_files", {}).items():
        path = run.fixres(unit)
        if not path.exists() or sha256_file(path) != want:
            raise PipelineError(f"{path} changed after stage 4 predicted with it: re-run ./run.sh all before "
                                f"exporting")
    return run, s4, head


def _check_pretrained(run: layout.RunDir, name: str, head: str) -> None:
    """A probe or WiSE-FT head's backbone is made from the pretrained weights: refused unless they are the file
    stage 2 recorded (by sha256)."""
    rec = read_json(run.fold(0).summary)["made_from"].get("pretrained_weights")
    path = load_config(run.config).model.pretrained_path
    if not rec or not path:
        raise PipelineError(f"member '{name}': head {head} runs on the pretrained backbone, and {run.config} names no "
                            f"model.pretrained_path file to make it from (hub weights are not bundled: import them "
                            f"with ./run.sh weights import, re-run, then export)")
    if not Path(path).exists() or sha256_file(path) != rec["sha256"]:
        raise PipelineError(f"member '{name}': head {head} runs on the pretrained backbone, and {path} is missing or "
                            f"not the file stage 2 used (sha256 {rec['sha256'][:12]}): restore it or re-run ./run.sh "
                            f"all before exporting")


def member_model(m: ModelCfg, variant: str, weights: Path, num_classes: int) -> torch.nn.Module:
    """The backbone a head's test predictions ran on in stage 4, made by its family (nets/families): the pretrained one
    (probe heads), fold k's WiSE-FT interpolation (wise heads; FixRes views use the same model, as stage 4 does), or
    the stage-2 / FixRes weights."""
    return family_of(variant).model(m, weights, num_classes, wise_alpha_of(variant))


# ----------------------------------------------------------------------------- one member
def bundle_member_config(mcfg: Config, s4: dict, submission: str) -> dict:
    """The config sections inference reads, with every derived pixel setting resolved (so a bundle does
    not depend on timm's pretrained defaults of another version)."""
    d = mcfg.to_dict()
    aug = dict(d["aug"], crop_pct=pixels(mcfg).crop_pct, store_side=pixels(mcfg).store_side, store=pixels(mcfg).store_format, cache="on")
    for k in keys_without_output("aug"):  # this machine's store settings; the bundle keeps its own store
        if k != "cache":
            aug.pop(k)
    return {"experiment": mcfg.experiment, "device": d["device"],
            "data": {k: d["data"][k] for k in DATA_KEYS},
            "model": dict(d["model"], pretrained=False, pretrained_path=None),
            "aug": aug,
            "train": {k: d["train"][k] for k in INFERENCE_TRAIN_KEYS},
            "eval": d["eval"],
            "infer": s4["made_from"]["infer"],
            "ensemble": {"submission": submission}}


def view_cv(s4: dict, head: str) -> dict:
    """OOF CV of each view alone, of no TTA and of the policy, for this head (stage 4's report)."""
    out = {}
    for row in s4["cv"]:
        if row["head"] == head:
            label = row["views"]
            key = label[:-len(" alone")] if label.endswith(" alone") else label
            out[key] = row["cv_mean"]
    return out


def export_member(name: str, run: layout.RunDir, s4: dict, head: str, target: layout.BundleMember, submission: str,
                  onnx: bool) -> dict:
    mcfg = load_config(run.config)
    classes = read_json(run.classes)
    C, K = len(classes), len(s4["made_from"]["weights"])
    policy = [BASELINE] if Member.parse(name).plain else s4["policy"]
    fixres = any(parse_view(v)[2] for v in policy)
    parts = test_parts(s4, head)
    full_weight = 0.0 if off_backbone(parts[0]) else s4.get("full_fit_weight", 0.0)  # off-backbone heads: folds only
    # the bundle's models: each part on every fold (the mix head: 2 x K models, the mean of their logits as stage 4
    # took it), the full-data model with the fine-tuned part
    slots = [(i, k, v) for i, (v, k) in enumerate((v, k) for v in parts for k in range(K))]
    slots += [(layout.FULL_FIT, layout.FULL_FIT, parts[0])] if full_weight > 0 else []
    factors = dict(zip(parts, mix_shares(s4.get("mix"), None))) if len(parts) > 1 else {}  # the mix's shares
    heads = {(k, v): Head.load(run.unit(k).head(v))[0] for _, k, v in slots if v != "joint"}
    normalised = any(h.normalize for h in heads.values())  # cosine heads are not a linear layer: kept as files
    folds, full = [], None
    for i, k, variant in slots:
        unit = run.unit(k)
        stage2 = read_json(unit.summary)
        h = heads.get((k, variant))
        sources = [(unit.weights, target.weights(i))]
        if fixres:
            sources.append((unit.weights if off_backbone(variant) else run.fixres(unit.name), target.fixres_weights(i)))
        for src, dst in sources:
            model = member_model(mcfg.model, variant, src, C)
            if h is not None and not h.normalize:
                clf = model.get_classifier()
                with torch.no_grad():
                    clf.weight.copy_(torch.as_tensor(h.weight))
                    clf.bias.copy_(torch.as_tensor(h.bias))
            if normalised and dst == target.weights(i):  # predict reads every model's head from its file then
                (h if h is not None else joint_head(model)).save(target.head(i), {"variant": head if len(parts) == 1
                                                                                   else variant, "fold": unit.name})
            dst.parent.mkdir(parents=True, exist_ok=True)
            models.write_state_dict(dst, model.state_dict(),
                                    {"arch": mcfg.model.arch, "num_classes": C, "head": head, "fold": unit.name})
            if onnx and dst == target.weights(i):
                export_onnx(mcfg.aug.img_size, model, Head.load(target.head(i))[0] if normalised else joint_head(model),
                            target.onnx(i))
        if k == layout.FULL_FIT:
            full = {"weight": full_weight * factors.get(variant, 1.0), "mean": stage2["mean"], "std": stage2["std"],
                    "epoch": stage2["epoch"]}
        else:
            folds.append({"fold": k, "mean": stage2["mean"], "std": stage2["std"], "score": stage2["score"],
                          "epoch": stage2["epoch"],
                          **({"head": variant, "weight": factors[variant]} if len(parts) > 1 else {})})
    info = {"name": name, "experiment": run.name, "head": head, "arch": mcfg.model.arch, "classes": classes,
            "num_classes": C, "folds": folds, "full": full, "fixres": fixres, "policy": policy, "merge": s4["merge"],
            "metric": s4["metric"], "view_cv": view_cv(s4, head), "head_in_weights": not normalised,
            "plain_timm": mcfg.model.pool == "avg" and mcfg.model.head == "linear",
            "plain_timm_note": plain_timm_note(mcfg.model.pool, mcfg.model.head, normalised)}
    write_text(target.config, yaml.safe_dump(bundle_member_config(mcfg, s4, submission), sort_keys=False))
    write_json(target.info, info)
    return info


def plain_timm_note(pool: str, head: str, normalised: bool) -> str:
    """How a bundle's fold weights load without the pipeline (the member's info.json)."""
    if pool == "avg" and head == "linear":
        return ("timm.create_model(arch, num_classes=C, checkpoint_path=fold<k>/model.safetensors) loads it"
                + (" with the joint classifier; the NCM head is head.safetensors" if normalised
                   else ", the chosen head included"))
    return (f"model.pool={pool} / model.head={head} replace timm's pooling layer (model.head=arcface: its output "
            f"L2-normalised): load with pipeline.core.nets.models.create_model")


def export_onnx(img_size: int, model, head: Head, path: Path) -> None:
    """Backbone + head as ONNX: input normalised float32 N x 3 x S x S (S = aug.img_size), output logits."""
    if importlib.util.find_spec("onnx") is None:  # torch's exporter needs it
        raise PipelineError("export --onnx needs the onnx package (pip install onnx); the bundle itself does not")
    if head.bank is not None:
        raise PipelineError("export --onnx: a kNN head is a search over the training features, not a layer; export "
                            "without --onnx (predict applies it), or choose another head")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.weight = torch.nn.Parameter(torch.as_tensor(head.weight), requires_grad=False)
            self.bias = torch.nn.Parameter(torch.as_tensor(head.bias), requires_grad=False)
            self.center = (torch.nn.Parameter(torch.as_tensor(head.center), requires_grad=False)
                           if head.center is not None else None)
            self.proj = (torch.nn.Parameter(torch.as_tensor(head.proj), requires_grad=False)
                         if head.proj is not None else None)

        def forward(self, x):
            f = models.features(self.model, x).float()
            if head.normalize:
                if self.center is not None:
                    f = f - self.center
                if self.proj is not None:
                    f = f @ self.proj
                f = torch.nn.functional.normalize(f, dim=1)
            return f @ self.weight.T + self.bias

    s = img_size
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.onnx"
        with warnings.catch_warnings():  # the TorchScript exporter is deprecated; the dynamo one needs onnxscript
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(Net().eval(), (torch.zeros(1, 3, s, s),), str(out), dynamo=False, input_names=["image"],
                              output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, path)


# ----------------------------------------------------------------------------- the package
def build_wheel(dest: Path) -> Path:
    """A wheel of this package, built with pip from a copy of the source (the checkout stays clean)."""
    src = Path(__file__).resolve().parents[2]
    if not (src / "pyproject.toml").is_file():
        raise PipelineError(f"export builds a wheel of the pipeline from its source folder, and {src} has no "
                            f"pyproject.toml (run export from a checkout, not an installed wheel)")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "src"
        shutil.copytree(src / "pipeline", copy / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
        for f in ("pyproject.toml", "README.md"):
            if (src / f).exists():
                shutil.copy(src / f, copy / f)
        r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "--disable-pip-version-check", "-q", "-w", str(dest), str(copy)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise PipelineError(f"building the pipeline wheel failed:\n{r.stderr.strip()[-2000:]}")
    wheels = sorted(dest.glob("pipeline-*.whl"))
    if not wheels:
        raise PipelineError(f"pip wheel left no pipeline wheel in {dest}")
    return wheels[-1]


def readme(name: str, manifest: dict, wheel: str) -> str:
    cv = manifest["expected_cv"]
    return f"""# Inference bundle `{name}`

Made by pipeline {manifest['version']} on {manifest['created']}: {len(manifest['members'])} member(s)
({', '.join(manifest['members'])}), ensemble `{manifest['method']}`, expected CV
({manifest['metric']}) {cv['cv_mean']:.4f} +- {cv['cv_std']:.4f}.

In a Kaggle notebook (no internet), with this folder attached as the dataset `{name}`:

```
!pip install --no-index --no-deps /kaggle/input/{name}/wheels/{wheel}
!python -m pipeline predict --bundle /kaggle/input/{name} --test-dir /kaggle/input/<competition>/test --sample-submission /kaggle/input/<competition>/sample_submission.csv --out /kaggle/working/submission.csv
```

torch, timm, albumentations 2.0.x, pandas, scikit-learn, safetensors and Pillow must be importable (the
Kaggle image has all but albumentations 2.0: attach its wheel too if needed). `--time-budget MIN` drops the
TTA views that helped least on OOF until the estimate fits; `--device cpu|cuda`, `--batch-size N`.
`manifest.json` lists every file with its sha256: predict refuses a bundle with a missing or altered file.
Each `members/*/fold*/model.safetensors` is also a plain timm checkpoint (see member.json, `plain_timm`).
"""


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


# ----------------------------------------------------------------------------- entry
def run(cfg: Config, out: str | None = None, zip_: bool = False, onnx: bool = False) -> dict:
    name, rec = stage5_record(cfg.ensemble, cfg.experiment)
    target = Path(out) if out else layout.export_dir(name)
    if target.exists() and not layout.BundleDir(target).manifest.exists() and any(target.iterdir()):
        raise PipelineError(f"{target} exists and is not an export bundle: choose another --out (nothing was "
                            f"written)")
    members = [(m, *current_member(m, rec)) for m in rec["members"]]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        b = layout.BundleDir(tmp)
        infos = [export_member(m, run, s4, head, b.member(m), cfg.ensemble.submission, onnx)
                 for m, run, s4, head in members]
        b.wheels.mkdir()
        wheel = build_wheel(b.wheels)
        ens_row = next(r for r in rec["table"] if str(r["member"]).startswith("ensemble"))
        d = cfg.to_dict()
        manifest = {
            "format": bundle_io.FORMAT, "version": __version__, "name": name,
            "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "members": [i["name"] for i in infos], "method": rec["method"], "weights": rec["weights"],
            "metric": rec["metric"], "expected_cv": {"cv_mean": ens_row["cv_mean"], "cv_std": ens_row["cv_std"]},
            "private": rec.get("private"), "submission": cfg.ensemble.submission, "top_k": cfg.ensemble.top_k,
            "data": {k: d["data"][k] for k in ("id_col", "label_col", "image_ext")},
            "made_with": environment(),
            "source_bytes": sum(folder_bytes(run.dir) for _, run, _, _ in members),
        }
        write_text(b.readme, readme(name, manifest, wheel.name))
        files = [p for p in tmp.rglob("*") if p.is_file()]
        manifest["files"] = bundle_io.file_entries(tmp, files)
        manifest["size_bytes"] = sum(e["bytes"] for e in manifest["files"].values())
        write_json(b.manifest, manifest)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"bundle": str(target), "size_bytes": manifest["size_bytes"], "source_bytes": manifest["source_bytes"],
              "members": manifest["members"]}
    if zip_:
        zpath = target.with_suffix(".zip")
        part = shutil.make_archive(str(zpath.with_name(f".{zpath.stem}.tmp-{os.getpid()}")), "zip", root_dir=target)
        os.replace(part, zpath)
        result["zip"] = str(zpath)
    log.info("exported %s: %d member(s), %d files, %.1f MB (the runs folders it came from: %.1f MB)%s",
             target, len(infos), len(manifest["files"]), manifest["size_bytes"] / 1e6, manifest["source_bytes"] / 1e6,
             f"; zip {result['zip']}" if zip_ else "")
    log.info("in a notebook: see %s", layout.BundleDir(target).readme)
    return result
