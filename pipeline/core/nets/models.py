"""Models: timm architectures by name, GeM or attention pooling, local pretrained weights, plain state dicts.

The model is the timm model itself (no wrapper), so its state dict has timm's own keys and loads
anywhere timm does. Stage 3 needs its two halves: `features` (pre-classifier, pooled) and the
classifier (`model.get_classifier()`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..files import layout
from ..config import ModelCfg
from ..engine.runtime import autocast
from ..errors import PipelineError
from ..report.progress import progress

log = logging.getLogger("pipeline")


class GeM(nn.Module):
    """Generalised mean pooling (Radenovic et al. 2018) with a learnable exponent p.

    p=1 is average pooling, p->inf max pooling. Inputs are clamped at eps (features after ReLU).
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, flatten: bool = True):
        super().__init__()
        self.p = nn.Parameter(torch.tensor([float(p)]))
        self.eps = eps
        self.flatten = flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.to(x.dtype)
        x = F.adaptive_avg_pool2d(x.clamp(min=self.eps).pow(p), 1).pow(1.0 / p)
        return x.flatten(1) if self.flatten else x

    # the two methods timm heads ask their pooling layer
    def feat_mult(self) -> int:
        return 1

    def is_identity(self) -> bool:
        return False


class AttnPool(nn.Module):
    """Attention pooling before the classifier (`model.pool: attn`): timm's RotAttentionPool2d (multi-head
    attention of a pooled query over every position, rotary position embeddings, so any input size works:
    progressive resizing, FixRes, multi-scale TTA). Its output has the input's channels, so the classifier,
    stage 3's features and every head stay as they are."""

    def __init__(self, channels: int, flatten: bool = True):
        super().__init__()
        from timm.layers import RotAttentionPool2d

        heads = channels // 64 if channels % 64 == 0 else 1
        self.pool = RotAttentionPool2d(channels, out_features=channels, num_heads=heads)
        self.flatten = flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(x)
        return y if self.flatten else y[:, :, None, None]

    def feat_mult(self) -> int:
        return 1

    def is_identity(self) -> bool:
        return False


def _install_pool(model: nn.Module, kind: str, p: float, arch: str) -> None:
    """Replace timm's global pooling (SelectAdaptivePool2d) with GeM or attention pooling."""
    from timm.layers import SelectAdaptivePool2d

    for name, mod in model.named_modules():
        if isinstance(mod, SelectAdaptivePool2d):
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            flatten = bool(mod.flatten.__class__.__name__ == "Flatten")
            new = GeM(p, flatten=flatten) if kind == "gem" else AttnPool(model.num_features, flatten=flatten)
            setattr(parent, name.rpartition(".")[2], new)
            return
    raise PipelineError(f"model.pool={kind} needs a CNN whose timm head pools with SelectAdaptivePool2d; "
                        f"'{arch}' has none (use model.pool=avg)")


class L2Pool(nn.Module):
    """model.head=arcface: the global pooling's output L2-normalised, so the pooled features (what stages 3-4 store
    and every head reads) are the unit vectors the cosine classifier was trained on."""

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.pool(x), dim=1)

    def feat_mult(self) -> int:
        return self.pool.feat_mult() if hasattr(self.pool, "feat_mult") else 1

    def is_identity(self) -> bool:
        return False


class SubCenterCosine(nn.Module):
    """Sub-center ArcFace's classifier (Deng et al. 2020), as stage 2 trains it (model.head=arcface): K sub-centers a
    class, logit_c = s x max_k cos(x, w_ck) on normalised features; the margin is the loss's (losses.SoftTargetLoss).
    While it trains it counts, per class, which sub-center wins the rows predicted as that class: the dominant one is
    what `linear()` keeps (the paper drops the others after training), so what stage 2 writes is a plain linear layer
    s x w_c on L2-normalised features, read by stages 3-5, export and predict like any other."""

    def __init__(self, in_features: int, num_classes: int, subcenters: int, scale: float):
        super().__init__()
        self.num_classes, self.k, self.scale = num_classes, subcenters, scale
        self.in_features, self.out_features = in_features, num_classes
        self.weight = nn.Parameter(torch.empty(num_classes * subcenters, in_features))
        nn.init.normal_(self.weight, std=0.01)
        self.register_buffer("hits", torch.zeros(num_classes, subcenters))

    def cosines(self, x: torch.Tensor) -> torch.Tensor:
        """N x C x K cosines of the normalised features and sub-centers."""
        w = F.normalize(self.weight.float(), dim=1)
        return F.linear(F.normalize(x.float(), dim=1), w).view(len(x), self.num_classes, self.k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cos = self.cosines(x)
        best, which = cos.max(2)
        if self.training:
            with torch.no_grad():
                c = best.argmax(1)
                self.hits.index_put_((c, which[torch.arange(len(c)), c]), torch.ones_like(c, dtype=self.hits.dtype),
                                     accumulate=True)
        return self.scale * best

    def linear(self) -> nn.Linear:
        """The dominant sub-center of each class (most rows won; ties: the first) as a linear layer s x w_c, bias 0."""
        lin = nn.Linear(self.in_features, self.num_classes)
        dominant = self.hits.argmax(1)
        w = F.normalize(self.weight.detach().float(), dim=1).view(self.num_classes, self.k, -1)
        with torch.no_grad():
            lin.weight.copy_(self.scale * w[torch.arange(self.num_classes), dominant])
            lin.bias.zero_()
        return lin


def _classifier_path(model: nn.Module) -> tuple[nn.Module, str]:
    clf = model.get_classifier()
    for name, mod in model.named_modules():
        if mod is clf and name:
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            return parent, name.rpartition(".")[2]
    raise PipelineError(f"'{type(model).__name__}' has no classifier module to replace (model.head=arcface)")


def _global_pool_path(model: nn.Module) -> tuple[nn.Module, str]:
    from timm.layers import SelectAdaptivePool2d

    for name, mod in model.named_modules():
        if isinstance(mod, (SelectAdaptivePool2d, GeM, AttnPool)):
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            return parent, name.rpartition(".")[2]
    raise PipelineError(f"model.head=arcface needs a CNN whose timm head pools with SelectAdaptivePool2d; "
                        f"'{type(model).__name__}' has none")


def inference_state(model: nn.Module) -> dict:
    """The state dict stage 2 writes: the model's own, or with a sub-center cosine classifier (model.head=arcface) the
    linear layer of its dominant sub-centers in its place (the architecture create_model builds for reading)."""
    clf = model.get_classifier()
    if not isinstance(clf, SubCenterCosine):
        return model.state_dict()
    parent, attr = _classifier_path(model)
    prefix = next(n for n, m in model.named_modules() if m is clf) + "."
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}
    sd.update({prefix + k: v for k, v in clf.linear().state_dict().items()})
    return sd


def create_model(m: ModelCfg, num_classes: int, pretrained: bool | None = None, training: bool = False) -> nn.Module:
    """The timm model of the `model` section; `pretrained=None` follows it. model.head=arcface: the pooled features
    L2-normalised and (`training`: stage 2) the sub-center cosine classifier in place of the linear one."""
    import timm

    use_hub = m.pretrained if pretrained is None else pretrained
    try:
        model = timm.create_model(m.arch, pretrained=bool(use_hub and not m.pretrained_path), num_classes=num_classes,
                                  drop_rate=m.drop_rate, drop_path_rate=m.drop_path_rate or None)
    except RuntimeError as e:
        if "Unknown model" in str(e) or "Invalid model" in str(e):
            raise PipelineError(f"config model.arch: unknown timm model '{m.arch}'") from None
        raise
    new_head = True  # the classifier is freshly initialised (not pretrained weights of the same class count)
    if m.pretrained_path and (pretrained is None or pretrained):
        new_head = bool(load_pretrained(model, m.pretrained_path))
    elif use_hub:
        new_head = num_classes != (model.pretrained_cfg or {}).get("num_classes")
    if m.pool != "avg":
        _install_pool(model, m.pool, m.gem_p, m.arch)
    if new_head:
        init_head(model, m.head_init_scale, m.head_init_bias)
    if m.head == "arcface":
        parent, attr = _global_pool_path(model)
        setattr(parent, attr, L2Pool(getattr(parent, attr)))
        if training:
            parent, attr = _classifier_path(model)
            setattr(parent, attr, SubCenterCosine(model.num_features, num_classes, m.arcface_subcenters, m.arcface_scale))
    return model


def init_head(model: nn.Module, scale: float | None, bias: float | None) -> None:
    """timm train.py's --head-init-scale / --head-init-bias on the classifier. timm's EfficientNet init draws
    a new 5-way head from U(+-1/sqrt(5)): logits of several units from pretrained features, an epoch-1 loss
    far above log(C) and big gradients into the backbone; a small scale starts near uniform predictions."""
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        if scale is not None or bias is not None:
            raise PipelineError(f"model.head_init_scale / head_init_bias need a linear classifier; "
                                f"'{type(model).__name__}' has {type(head).__name__}")
        return
    with torch.no_grad():
        if scale is not None:
            head.weight.mul_(scale)
            if head.bias is not None:
                head.bias.mul_(scale)
        if bias is not None and head.bias is not None:
            head.bias.fill_(bias)


def weights_record(path: str | Path | None) -> dict | None:
    """What `weights import` recorded beside a weights file (source, sha256, mapping, the weights' own
    pretrained config: mean, std, crop_pct), or None for a file without one."""
    if not path:
        return None
    rec_path = layout.weights_record(path)
    if not rec_path.is_file():
        return None
    try:
        rec = json.loads(rec_path.read_text())
    except (OSError, ValueError) as e:
        raise PipelineError(f"{rec_path}: the record beside {path} is unreadable ({e}); re-run ./run.sh weights "
                            f"import, or remove it to use the architecture's defaults") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("pretrained_cfg", {}), dict):
        raise PipelineError(f"{rec_path}: not a weights record (a JSON object with pretrained_cfg)")
    return rec


def load_pretrained(model: nn.Module, path: str) -> list[str]:
    """Load local weights (safetensors or a torch file, loaded with weights_only=True).

    A classifier of another shape (ImageNet's 1000 classes) is dropped and stays freshly initialised;
    returns the dropped keys.
    """
    sd = read_state_dict(path)
    own = model.state_dict()
    head = model.default_cfg.get("classifier") if hasattr(model, "default_cfg") else None
    dropped = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if dropped and head and not all(k.startswith(head) for k in dropped):
        bad = [k for k in dropped if not k.startswith(head)]
        raise PipelineError(f"{path}: shapes differ from model '{type(model).__name__}' at {bad[:3]}: wrong architecture?")
    for k in dropped:
        sd.pop(k)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in dropped and not (head and k.startswith(head))]
    if missing or unexpected:
        raise PipelineError(f"{path}: does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    log.info("loaded pretrained weights from %s%s", path, f" (new classifier: {dropped})" if dropped else "")
    return dropped


def clean_state_dict(sd: dict) -> dict:
    """Plain keys: no DataParallel 'module.' or torch.compile '_orig_mod.' prefixes; contiguous CPU tensors."""
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        k = k.replace("._orig_mod.", ".")
        out[k] = v.detach().cpu().contiguous()
    return out


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from .safetensors, or a torch file loaded with weights_only=True (no pickle code runs)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"weights file not found: {path}")
    if path.stat().st_size == 0:
        raise PipelineError(f"{path}: the file is empty (0 bytes): not a checkpoint (an interrupted download or copy?)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise PipelineError(f"{path}: not a valid safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an unpickling error: refused, and nothing in it was executed
        raise PipelineError(f"{path}: not a checkpoint this pipeline reads ({_load_failure(e)}). Weights are read "
                            f"as plain tensors only (.safetensors, or a torch file of tensors); a truncated or "
                            f"corrupt file, or one holding pickled code, is refused") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise PipelineError(f"{path}: expected a state dict, got {type(obj).__name__}")
    odd = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise PipelineError(f"{path}: entries that are not tensors ({odd[:3]}): not a plain state dict")
    return clean_state_dict(obj)


def _load_failure(e: Exception) -> str:
    """torch.load's error in a few words, never with its advice to re-run with weights_only=False (unpickling a
    file of unknown origin runs its code)."""
    text = str(e)
    if "Weights only load failed" in text or "weights_only" in text:
        return "it holds objects other than tensors, which are never unpickled here"
    if "PytorchStreamReader" in text or "zip archive" in text:
        return "a damaged or truncated torch archive"
    return f"not a torch file ({type(e).__name__})"


def write_state_dict(path: str | Path, sd: dict, meta: dict | None = None) -> None:
    from safetensors.torch import save_file

    from ..files.artifacts import atomic_path

    with atomic_path(path, suffix=".safetensors") as tmp:
        # one metadata key: safetensors writes several in hash order, and files must be byte-reproducible
        save_file(clean_state_dict(sd), str(tmp), metadata={"pipeline": json.dumps(meta or {}, sort_keys=True)})


def norm_stats(m: ModelCfg, model: nn.Module) -> tuple[list[float], list[float]]:
    """Input mean/std: the config's, else the imported weights' (their record), else the model's pretrained
    config's (timm), else ImageNet's."""
    pc = dict(getattr(model, "pretrained_cfg", {}) or {})
    pc.update((weights_record(m.pretrained_path) or {}).get("pretrained_cfg", {}))
    mean = m.mean or list(pc.get("mean", (0.485, 0.456, 0.406)))
    std = m.std or list(pc.get("std", (0.229, 0.224, 0.225)))
    return [float(x) for x in mean], [float(x) for x in std]


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled pre-classifier features (what stage 3 retrains the classifier on)."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def logits(model: nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Evaluation logits: the backbone under autocast (`dtype`), the classifier in fp32. Stages 2, 3
    and 4 all score this way, so stage 3's cached features reproduce stage 2's OOF logits and a TTA
    policy of the plain view reproduces them too, whatever the precision."""
    with autocast(x.device, dtype):
        f = features(model, x)
    return model.get_classifier()(f.float()).float()


def to_input(x: torch.Tensor, norm: torch.nn.Module, device: torch.device,
             fmt: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """A loader's uint8 batch -> the model's input: on the device, normalised, in its memory format."""
    return norm(x.to(device, non_blocking=True)).contiguous(memory_format=fmt)


class Normalize(nn.Module):
    """uint8 NHWC batches -> normalised float NCHW on the model's device (cheap host->device copies)."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.permute(0, 3, 1, 2).float() - self.mean) / self.std


def load_trained(m: ModelCfg, weights: str | Path, num_classes: int) -> nn.Module:
    """The `model` section's architecture with stage-2 weights (strict: another architecture or class count
    is refused with the file named)."""
    model = create_model(m, num_classes, pretrained=False)
    sd = read_state_dict(weights)
    own = model.state_dict()
    wrong = [k for k in sd if k in own and own[k].shape != sd[k].shape]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if wrong or missing or unexpected:
        detail = (f"shape mismatch at {wrong[:3]}" if wrong else f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        raise PipelineError(f"{weights} does not fit model.arch={m.arch} with {num_classes} classes "
                            f"({detail}): weights of another architecture or class count?")
    model.load_state_dict(sd)
    return model.eval()


@torch.no_grad()
def wise_model(m: ModelCfg, weights: str | Path, num_classes: int, alpha: float) -> nn.Module:
    """WiSE-FT (Wortsman et al., CVPR 2022): the stage-2 weights in `weights` interpolated with the pretrained ones
    of the `model` section, (1 - alpha) x pretrained + alpha x fine-tuned, tensor by tensor (BN running statistics
    too; integer buffers such as BN's batch counts: the fine-tuned model's). The classifier stays the fine-tuned one
    (the pretrained model's would be freshly drawn): the callers score the pooled features with their own head
    (stage 3's wise<alpha>: the probe and fine-tuned classifiers mixed the same way)."""
    model = load_trained(m, weights, num_classes)
    pre = create_model(m, num_classes).state_dict()
    clf = {id(p) for p in model.get_classifier().parameters()}
    keep = {k for k, p in model.named_parameters() if id(p) in clf}
    sd = {k: torch.lerp(pre[k].to(v.dtype), v, alpha) if v.is_floating_point() and k not in keep else v
          for k, v in model.state_dict().items()}
    model.load_state_dict(sd)
    return model.eval()


@torch.no_grad()
def iter_features(model: nn.Module, loader, norm: nn.Module, device: torch.device,
                  dtype: torch.dtype | None = None, fmt=torch.contiguous_format):
    """Pooled pre-classifier features of the images of `loader`, in order, a batch (float32 numpy) at a time."""
    model.eval()
    for x, _ in progress(loader, len(loader), "features", "batch"):
        x = to_input(x, norm, device, fmt)
        with autocast(device, dtype):
            yield features(model, x).float().cpu().numpy()


def extract_features(model: nn.Module, loader, norm: nn.Module, device: torch.device,
                     dtype: torch.dtype | None = None, fmt=torch.contiguous_format) -> np.ndarray:
    """Pooled pre-classifier features of every image of `loader`, in order."""
    return np.concatenate(list(iter_features(model, loader, norm, device, dtype, fmt)))


def head_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters after the backbone: the classifier and a learned pooling (GeM's p, attention)."""
    ids = {id(p) for p in model.get_classifier().parameters()}
    for m in model.modules():
        if isinstance(m, (GeM, AttnPool)):
            ids |= {id(p) for p in m.parameters()}
    return ids


def frozen_parameters(model: nn.Module, freeze_backbone: bool, trainable_stages: int | None) -> tuple[set[int], list[str]]:
    """ids of the parameters that never train (a linear probe: every backbone parameter; partial fine-tuning:
    all but the last `trainable_stages` of timm's coarse parameter groups, stem included) and the frozen group
    names, from timm's group matcher (model.group_matcher), not parameter-name substrings."""
    head = head_parameters(model)
    if freeze_backbone or trainable_stages == 0:
        return {id(p) for p in model.parameters() if id(p) not in head}, ["backbone"]
    if trainable_stages is None:
        return set(), []
    from timm.models import group_parameters

    if not hasattr(model, "group_matcher"):
        raise PipelineError(f"train.trainable_stages: timm model '{type(model).__name__}' has no group matcher")
    named = dict(model.named_parameters())
    groups = group_parameters(model, model.group_matcher(coarse=True))  # {group id: names}, input side first
    stages = [(g, [named[n] for n in groups[g]]) for g in sorted(groups)]
    stages = [(g, ps) for g, ps in stages if not any(id(p) in head for p in ps)]
    frozen = stages[:max(0, len(stages) - trainable_stages)]
    return {id(p) for _, ps in frozen for p in ps}, [str(g) for g, _ in frozen]


@torch.no_grad()
def class_activation_maps(model: nn.Module, x: torch.Tensor, classes: torch.Tensor,
                          weight: torch.Tensor | None = None) -> torch.Tensor:
    """Class activation maps (Zhou et al. 2016): the classifier row of each image's class applied to every
    position of the last feature map, upsampled to the input size and scaled to [0, 1] per image (B x H x W).
    Exact for average pooling; with GeM or attention pooling it shows the same linear read-out per position."""
    fm = model.forward_features(x)
    if fm.ndim != 4:
        raise PipelineError("class activation maps need a CNN's spatial feature map (B x C x H x W)")
    if fm.shape[2] * fm.shape[3] < 4:
        raise PipelineError(f"the feature map is {fm.shape[2]}x{fm.shape[3]} at {x.shape[-1]} px: too coarse for class "
                            f"activation maps (they need a larger aug.img_size for this model's stride)")
    w = (weight if weight is not None else model.get_classifier().weight).to(fm.device).float()
    cam = torch.einsum("bchw,bc->bhw", fm.float(), w[classes])
    cam = F.interpolate(cam[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    lo = cam.flatten(1).min(1).values[:, None, None]
    hi = cam.flatten(1).max(1).values[:, None, None]
    return (cam - lo) / (hi - lo).clamp_min(1e-12)
