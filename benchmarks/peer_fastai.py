"""The fastai peer of benchmarks/pretrained.py (#47 item 4; not a test, not a dependency of the pipeline): fastai's
own `fine_tune` recipe on the same timm weights, photos and image size, evaluated on the same hold-out photos.

    pip install --target ~/.cache/fastai-libs --no-deps fastai fastcore fasttransform "fastprogress==1.0.3" \
        fastdownload "plum-dispatch<2.10" beartype requests urllib3 certifi charset-normalizer idna rich
    PYTHONPATH=~/.cache/fastai-libs python benchmarks/peer_fastai.py DATA_DIR --arch tf_efficientnet_lite0 \
        --weights weights/tf_efficientnet_lite0.safetensors --size 64 --epochs 2

DATA_DIR is timm's ImageFolder layout (train/<class>/, validation/<class>/ = the hold-out photos), as
benchmarks/pretrained.py builds it. The recipe is fastai's as documented (`Learner.fine_tune`): `vision_learner`
(its concat-pool + BN + dropout head, Adam, wd 0.01, train_bn), 1 epoch of the head only (one-cycle), then all
layers with discriminative learning rates slice(base_lr/200, base_lr/2) for the remaining epochs (one-cycle,
pct_start 0.3, div 5); augmentation: `Resize` then `aug_transforms(size, min_scale=0.75)`, the fastai course's
default. --epochs counts every epoch, the frozen one included, so the images seen equal timm's train.py at the
same --epochs and, at K = 2 folds, the pipeline's 2 folds x the same epochs (each fold trains on half the rows).
Prints one JSON line: accuracy of the last epoch on the hold-out photos and the wall minutes.
"""
from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data_dir")
    ap.add_argument("--arch", required=True)
    ap.add_argument("--weights", required=True, help="the timm checkpoint (safetensors) the pipeline fine-tunes")
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--epochs", type=int, required=True, help="all epochs, the frozen one included (>= 2)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--base-lr", type=float, default=2e-3, help="fastai's fine_tune default")
    ap.add_argument("--crop-pct", type=float, default=0.875)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()
    if args.epochs < 2:
        ap.error("--epochs: fine_tune needs the frozen epoch and at least one more")
    import torch
    from fastai.vision.all import (ImageDataLoaders, Resize, accuracy, aug_transforms, set_seed, vision_learner)

    torch.set_num_threads(torch.get_num_threads())
    set_seed(args.seed, reproducible=False)
    dls = ImageDataLoaders.from_folder(args.data_dir, train="train", valid="validation", bs=args.batch_size,
                                       item_tfms=Resize(round(args.size / args.crop_pct)),
                                       batch_tfms=aug_transforms(size=args.size, min_scale=0.75), num_workers=0,
                                       device=torch.device("cpu"))
    learn = vision_learner(dls, args.arch, pretrained=True, metrics=accuracy,
                           pretrained_cfg_overlay=dict(file=str(args.weights)))
    t0 = time.perf_counter()
    learn.fine_tune(args.epochs - 1, base_lr=args.base_lr, freeze_epochs=1)
    minutes = (time.perf_counter() - t0) / 60
    _, acc = learn.validate()
    print(json.dumps({"peer": "fastai fine_tune", "size": args.size, "epochs": args.epochs, "holdout": float(acc),
                      "minutes": minutes}), flush=True)


if __name__ == "__main__":
    main()
