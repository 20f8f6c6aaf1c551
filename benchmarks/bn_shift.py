"""#47 lead: how far a set's photos move the pretrained backbone's BatchNorm statistics, measured before training.

The plain short fine-tune (batch statistics) wins on flowers5 and grocery81 (128 px photos shown at 64 px) and LP-FT
(BN statistics frozen) on CIFAR-10 upsampled from 32 px (docs/benchmarks/pretrained.md, seventh session). A
recipe chosen from a measurement the run can make first would need one that separates them. This prints, per set,
the pretrained Lite0's BatchNorm inputs on `--n` train photos (at the set's img_size, the model's normalisation)
against the running statistics the weights carry: the mean over layers and channels of the Gaussian KL divergence
KL(batch || running), and of the squared mean shift in running standard deviations. Nothing is written.

    python benchmarks/bn_shift.py [--sets flowers5 grocery81 cifar10s cifar10lt] [--n 256] [--size 64]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.config import load_config  # noqa: E402
from pipeline.core.inputs.data import read_train_table  # noqa: E402
from pipeline.core.nets import models  # noqa: E402

SETS = {"flowers5": "configs/flowers5_pretrained.yaml", "grocery81": "configs/grocery81_pretrained.yaml",
        "cifar10s": "configs/cifar10s_pretrained.yaml", "cifar10lt": "configs/cifar10lt_pretrained.yaml"}


def batch(paths: list, size: int, mean, std) -> torch.Tensor:
    out = []
    for p in paths:
        im = Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im, np.float32) / 255.0).permute(2, 0, 1))
    x = torch.stack(out)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def shift(set_name: str, n: int, size: int) -> tuple[float, float]:
    cfg = load_config(SETS[set_name], [])
    df = read_train_table(cfg.data)
    rows = np.random.default_rng(0).choice(len(df), min(n, len(df)), replace=False)
    model = models.create_model(cfg.model, 10).eval()
    mean, std = models.norm_stats(cfg.model, model)
    kls, shifts = [], []

    def hook(mod, inp, _out):
        x = inp[0].detach().double()
        mu, var = x.mean((0, 2, 3)), x.var((0, 2, 3))
        rm, rv = mod.running_mean.double(), mod.running_var.double() + mod.eps
        kls.append(float((0.5 * (var / rv + (mu - rm) ** 2 / rv - 1 - torch.log(var / rv + 1e-12))).mean()))
        shifts.append(float(((mu - rm) ** 2 / rv).mean()))
    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        model(batch(list(df["path"].iloc[rows]), size, mean, std))
    for h in hooks:
        h.remove()
    return float(np.mean(kls)), float(np.mean(shifts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="*", default=list(SETS))
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    print("| set | mean KL(batch stats || running stats) over BN layers | mean squared mean shift (running sd units) |")
    print("|---|---|---|")
    for s in args.sets:
        kl, sh = shift(s, args.n, args.size)
        print(f"| {s} | {kl:.3f} | {sh:.3f} |", flush=True)


if __name__ == "__main__":
    main()
