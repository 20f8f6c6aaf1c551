"""Head families: which backbone a head's logits come from, and how that backbone is made.

A stage-3 variant belongs to one family by the backbone its logits are computed on: the fold's fine-tuned model
(joint, crt, tau, lws, ncm, knn, ...), the pretrained one (probe_<variant>, rebalance.probe) or the fold's WiSE-FT
interpolation (wise<alpha>, rebalance.wise_alpha). Stage 4 plans one backbone per model of a family, export bundles
the family's model, teachers take the fine-tuned family only. The mix head (infer.mix) and `best` are made of the
families' variants, not a family of their own. A new family is one entry here (its names and its model), its
fitting in stage 3 and its name in the schema (config.Head).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..config import MIX, PROBE, ModelCfg, off_backbone, wise_alpha_of, wise_name


@dataclass(frozen=True)
class FamilyModel:
    """One model a family runs in stage 4: its name in stage 4's store, the folds whose heads read it, the fold
    whose stage-2 weights (and input normalisation) it is made from (None: the pretrained weights and their own
    normalisation) and its alpha (WiSE-FT)."""
    name: str
    folds: tuple[int, ...]
    k: int | None = None
    alpha: float | None = None


@dataclass(frozen=True)
class Family:
    """`owns(variant, alpha)`: the stage-3 variants that are its (alpha: a WiSE-FT backbone's); `nested`: fold k's
    held-out rows take the head of each inner split (a tuned variant, as stage 3 scored them); `make(model section,
    the fold's stage-2 weights, classes, alpha)`: its model; `backbones(folds, picks, fold_name)`: the models stage 4
    runs for it (`picks(k)`: the variants that score fold k; `fold_name(k)`: fold k's folder name). The fine-tuned
    family has none here: its backbones are stage 2's trained units (every fold, the full-data model, FixRes copies)."""
    name: str
    owns: Callable[..., bool]
    make: Callable[..., object]
    nested: bool = True
    backbones: Callable[..., list[FamilyModel]] | None = None

    def model(self, m: ModelCfg, weights: str | Path | None, n_classes: int, alpha: float | None = None):
        return self.make(m, weights, n_classes, alpha)


def _fine_tuned(m, weights, n_classes, alpha):
    from .models import load_trained
    return load_trained(m, weights, n_classes)


def _pretrained(m, weights, n_classes, alpha):
    from .models import create_model
    return create_model(m, n_classes)


def _wise(m, weights, n_classes, alpha):
    from .models import wise_model
    return wise_model(m, weights, n_classes, alpha)


PRETRAINED = "pretrained"  # stage 4's name of the un-fine-tuned backbone (rebalance.probe heads)


def _one_pretrained(folds: list[int], picks, fold_name) -> list[FamilyModel]:
    return [FamilyModel(PRETRAINED, tuple(folds))]  # one model for every fold's probe heads


def _wise_per_fold(folds: list[int], picks, fold_name) -> list[FamilyModel]:
    return [FamilyModel(f"{fold_name(k)}.{wise_name(a)}", (k,), k, a) for k in folds
            for a in sorted({a for a in map(wise_alpha_of, picks(k)) if a is not None})]


FINE_TUNED = Family("fine-tuned", lambda v, a=None: not off_backbone(v) and v not in (MIX, "best"), _fine_tuned)
PROBES = Family("probe", lambda v, a=None: v.startswith(PROBE), _pretrained, backbones=_one_pretrained)
WISE_FT = Family("wise", lambda v, a=None: v == wise_name(a) if a is not None else wise_alpha_of(v) is not None,
                 _wise, nested=False, backbones=_wise_per_fold)  # alpha is the variant: nothing tuned on fold rows
FAMILIES = (FINE_TUNED, PROBES, WISE_FT)


def family_of(variant: str) -> Family:
    """The family of a stage-3 variant (refused for the mix head and `best`: they are made of several)."""
    for f in FAMILIES:
        if f.owns(variant):
            return f
    raise ValueError(f"{variant} belongs to no head family (mix and best are made of variants)")
