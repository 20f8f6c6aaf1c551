"""The competition data contract: reading and validating train/test tables, label encoding, images.

Two train layouts are accepted (config `data.layout`):
- csv: `train.csv` with an id column (a path relative to `train_dir`, extension optional via
  `data.image_ext`), a label column and optionally a group column;
- folders: `train_dir/<class>/*.<ext>`, the FGVC habit; ids become `<class>/<file>`.
Test images are the ids of `sample_submission.csv` (their order is the submission's order) or,
without one, every image file in `test_dir`, sorted.

Every check runs before any work and raises PipelineError naming the file and rows at fault.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from .config import Config
from .errors import PipelineError
from .images import BOMB, open_image
from .metrics import score

log = logging.getLogger("pipeline")

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _short(x, limit: int = 120) -> str:
    r = repr(x)
    return r if len(r) <= limit else r[: limit - 20] + f"...({len(r)} chars)"


def _first(items, n: int = 5) -> str:
    items = list(items)
    head = ", ".join(_short(x) for x in items[:n])
    return head + (f" and {len(items) - n} more" if len(items) > n else "")


# ----------------------------------------------------------------------------- tables
def read_table(path: Path, what: str | None = None) -> pd.DataFrame:
    """A CSV table with every cell a string, read as written: only a truly empty cell is empty ("" here),
    so a class or id literally named None, NA or null is itself, never a missing value."""
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
        raise PipelineError(f"cannot parse {what or path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                            ) from None
    except (IsADirectoryError, PermissionError) as e:
        raise PipelineError(f"cannot read {what or path}: {e}") from None


def _strip_cells(df: pd.DataFrame, cols: dict[str, str], where: str) -> pd.DataFrame:
    """Surrounding whitespace of ids, labels and groups is not part of them ("a " is the class "a")."""
    for col, key in cols.items():
        stripped = df[col].str.strip()
        n = int((stripped != df[col]).sum())
        if n:
            log.warning("warning: %s: stripped surrounding whitespace from %d value(s) of column '%s'", where, n, key)
        df[col] = stripped
    return df


def _same_files(df: pd.DataFrame, where: str) -> None:
    """Refuse rows whose ids name one file (`img1` and `img1.png` with image_ext .png, case variants on a
    case-insensitive disk, links): judged by the file itself (device, inode), not the id text."""
    seen: dict[tuple, int] = {}
    clashes = []
    for i, p in enumerate(df["path"]):
        st = os.stat(p)
        key = (st.st_dev, st.st_ino)
        if key in seen:
            j = seen[key]
            clashes.append(f"rows {j + 2} ({df['id'].iloc[j]!r}) and {i + 2} ({df['id'].iloc[i]!r})")
        else:
            seen[key] = i
    if clashes:
        more = f" and {len(clashes) - 3} more" if len(clashes) > 3 else ""
        raise PipelineError(f"{where}: {len(clashes)} pair(s) of ids name the same image file: "
                            f"{'; '.join(clashes[:3])}{more}; keep one row per image")


# ----------------------------------------------------------------------------- ids and paths
def _resolve_ids(ids: pd.Series, image_dir: Path, ext: str, what: str) -> list[Path]:
    """Map ids to files inside image_dir, refusing any id that would leave it."""
    root = image_dir.resolve()
    paths, escaping, invalid = [], [], []
    for i, raw in enumerate(ids):
        name = str(raw)
        if ext and not name.lower().endswith(ext.lower()):
            name += ext
        p = Path(name)
        if p.is_absolute() or ".." in p.parts or name.startswith("~"):
            escaping.append((i, raw))
            continue
        if "\x00" in name or any(len(part) > 255 for part in p.parts) or len(name) > 4000:
            invalid.append((i, raw))  # no file can have this name
            continue
        full = image_dir / p
        if full.exists() and not full.resolve().is_relative_to(root):
            escaping.append((i, raw))  # a symlink that leads out of the image folder
            continue
        paths.append(full)
    if escaping:
        rows = _first(f"row {i + 2}: {r}" for i, r in escaping)
        raise PipelineError(f"{what}: {len(escaping)} id(s) point outside {image_dir}: {rows}")
    if invalid:
        rows = _first(f"row {i + 2}: {r}" for i, r in invalid)
        raise PipelineError(f"{what}: {len(invalid)} id(s) cannot be file names (too long, or a NUL byte): {rows}")
    return paths


def _check_images(paths: list[Path], mode: str, what: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise PipelineError(f"{what}: {len(missing)} of {len(paths)} image file(s) missing: {_first(map(str, missing))}")
    empty = [p for p in paths if p.stat().st_size == 0]
    if empty:
        raise PipelineError(f"{what}: {len(empty)} image file(s) are empty (0 bytes): {_first(map(str, empty))}")
    if mode == "none":
        return
    bad, bombs = [], []
    for p in paths:
        try:
            with open_image(p) as im:
                if mode == "full":
                    im.load()
        except BOMB as e:
            bombs.append(f"{p} ({e})")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
            bad.append(f"{p} ({e.__class__.__name__})")
    if bombs:
        raise PipelineError(f"{what}: {len(bombs)} image(s) refused as decompression bombs (more pixels than PIL's "
                            f"limit of {Image.MAX_IMAGE_PIXELS}): {_first(bombs, 3)}; downscale them if genuine")
    if bad:
        raise PipelineError(f"{what}: {len(bad)} unreadable image file(s): {_first(bad)}")


# ----------------------------------------------------------------------------- train table
def read_train_table(cfg: Config) -> pd.DataFrame:
    """The validated training table with columns id, label (original values), [group], path."""
    d = cfg.data
    train_dir = cfg.data_path(d.train_dir)
    if not train_dir.is_dir():
        raise PipelineError(f"train image folder not found: {train_dir} (config data.root / data.train_dir)")
    if d.layout == "folders":
        df = _scan_class_folders(train_dir)
        what = str(train_dir)
    else:
        csv = cfg.data_path(d.train_csv)
        what = str(csv)
        if not csv.is_file():
            raise PipelineError(f"train table not found: {csv} (config data.root / data.train_csv)")
        raw = read_table(csv)
        need = [d.id_col, d.label_col] + ([d.group_col] if d.group_col else [])
        absent = [c for c in need if c not in raw.columns]
        if absent:
            raise PipelineError(f"{csv}: missing column(s) {absent}; it has {list(raw.columns)} "
                                f"(config data.id_col / data.label_col / data.group_col)")
        df = pd.DataFrame({"id": raw[d.id_col], "label": raw[d.label_col]})
        cols = {"id": d.id_col, "label": d.label_col}
        if d.group_col:
            df["group"] = raw[d.group_col]
            cols["group"] = d.group_col
        df = _strip_cells(df, cols, str(csv))
        for col, key in cols.items():
            empty = df.index[df[col] == ""].tolist()
            if empty:
                raise PipelineError(f"{csv}: empty value in column '{key}' at row(s) {_first(r + 2 for r in empty)}")
        check_single_label(df["label"], str(csv), d.label_col)
        df["label"] = _normalise_labels(df["label"])
    if df.empty:
        raise PipelineError(f"{what}: no training images (empty class list)")
    dup = df["id"][df["id"].duplicated()].unique()
    if len(dup):
        raise PipelineError(f"{what}: {len(dup)} duplicate id(s): {_first(dup)}")
    n_classes = df["label"].nunique()
    if n_classes < 2:
        raise PipelineError(f"{what}: found {n_classes} class(es) {_first(df['label'].unique())}; "
                            f"classification needs at least 2")
    df["path"] = [str(p) for p in _resolve_ids(df["id"], train_dir, d.image_ext if d.layout == "csv" else "", what)]
    _check_images([Path(p) for p in df["path"]], d.check_images, what)
    _same_files(df, what)
    return df.reset_index(drop=True)


SUPPORTED = ("the pipeline trains single-label classification: one class per row, a string or an integer "
             "(\"007\" stays a string)")


def check_single_label(labels: pd.Series, where: str, col: str) -> None:
    """Refuse targets that would be silently misread as classes: non-integer numbers (a regression
    target) and multi-label rows ("scab rust", "a|b": other labels joined by a separator)."""
    txt = labels.astype(str).str.strip()
    num = pd.to_numeric(txt, errors="coerce")
    if num.notna().all():
        frac = txt[(num != num.round()).values].unique()
        if len(frac):
            raise PipelineError(f"{where}: column '{col}' holds non-integer numbers ({_first(frac, 3)}): a regression "
                                f"target, not classes; {SUPPORTED}")
        return
    uniq = set(txt.unique())
    for sep in (" ", "|", ";", ","):
        split = {v: [t for t in v.split(sep) if t] for v in uniq}
        multi = [v for v, toks in split.items() if len(toks) > 1]
        if not multi:
            continue
        singles = uniq - set(multi)
        joined = [v for v in multi if all(t in singles for t in split[v])]  # made of other labels
        if sep != " " and not joined and len(multi) >= 2:
            tokens = [t for v in multi for t in split[v]]
            joined = multi if len(set(tokens)) < len(tokens) else []  # combinations sharing labels
        if joined:
            raise PipelineError(
                f"{where}: column '{col}' looks multi-label: {len(joined)} value(s) join other labels with "
                f"{sep!r}, e.g. {_first(sorted(joined), 3)}; {SUPPORTED}. To train each combination as a class of "
                f"its own, write it without the separator (e.g. 'scab+rust')")


def _normalise_labels(s: pd.Series) -> pd.Series:
    """Integer labels stay int (1.0 -> 1, "7" -> 7, "2.0" -> 2); anything else, "007" included, stays a string."""
    if pd.api.types.is_integer_dtype(s):
        return s.astype(np.int64)
    if pd.api.types.is_float_dtype(s) and (s == s.round()).all():
        return s.astype(np.int64)
    txt = s.astype(str)
    if txt.str.fullmatch(r"-?(0|[1-9][0-9]*)").all():
        return txt.astype(np.int64)
    if txt.str.fullmatch(r"-?(0|[1-9][0-9]*)(\.0*)?").all():  # "1.0" and "1" are one class, as numbers are
        return pd.to_numeric(txt).astype(np.int64)
    return txt


def _scan_class_folders(train_dir: Path) -> pd.DataFrame:
    rows = []
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    for c in classes:
        for f in sorted((train_dir / c).iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTS:
                rows.append((f"{c}/{f.name}", c))
    df = pd.DataFrame(rows, columns=["id", "label"])
    if not df.empty:
        df["label"] = _normalise_labels(df["label"])
    return df


# ----------------------------------------------------------------------------- classes
def make_classes(labels: pd.Series) -> list:
    """The label encoding: sorted unique labels (numbers numerically), index = class id."""
    vals = labels.unique().tolist()
    return sorted(vals, key=lambda v: (isinstance(v, str), v))


def encode(labels: pd.Series, classes: list, what: str) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({v for v in labels if v not in index}, key=str)
    if unknown:
        raise PipelineError(f"{what}: label(s) not in the saved class list: {_first(unknown)}")
    return np.array([index[v] for v in labels], dtype=np.int64)


def to_builtin(v):
    """numpy scalars to Python ones, for JSON."""
    return v.item() if hasattr(v, "item") else v


# ----------------------------------------------------------------------------- test table
def read_test_table(cfg: Config, require_images: bool = True) -> pd.DataFrame:
    """Test ids (submission order) and image paths. Columns: id, path."""
    d = cfg.data
    test_dir = cfg.data_path(d.test_dir)
    if d.sample_submission:
        sub_path = cfg.data_path(d.sample_submission)
        sub = read_sample_submission(cfg)
        ids = sub.iloc[:, 0].astype(str)
        what = str(sub_path)
    else:
        if not test_dir.is_dir():
            raise PipelineError(f"test image folder not found: {test_dir}")
        files = sorted(f.name for f in test_dir.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
        ids = pd.Series(files, dtype=str)
        what = str(test_dir)
    if ids.empty:
        raise PipelineError(f"{what}: no test images")
    if require_images:
        if not test_dir.is_dir():
            raise PipelineError(f"test image folder not found: {test_dir}")
        paths = _resolve_ids(ids, test_dir, d.image_ext, what)
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise PipelineError(f"{what}: {len(missing)} test id(s) have no image in {test_dir}: {_first(missing)}")
        _check_images(paths, d.check_images, what)
        table = pd.DataFrame({"id": ids.values, "path": [str(p) for p in paths]})
        if d.sample_submission:
            check_test_folder(cfg, table)
        return table
    paths = [test_dir / i for i in ids]
    return pd.DataFrame({"id": ids.values, "path": [str(p) for p in paths]})


def check_test_folder(cfg: Config, test: pd.DataFrame) -> None:
    """Refuse image files in the test folder that the sample submission does not list: a hidden test set
    that does not match its sample submission (a Kaggle code competition's rerun) would be scored short."""
    test_dir = cfg.data_path(cfg.data.test_dir)
    listed = {Path(p).resolve() for p in test["path"]}
    extra = sorted(f.name for f in test_dir.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTS
                   and f.resolve() not in listed)
    if extra:
        raise PipelineError(f"{test_dir}: {len(extra)} image(s) are not in the sample submission "
                            f"{cfg.data_path(cfg.data.sample_submission)}: {_first(extra)} (a truncated sample "
                            f"submission, or a test folder of another competition?)")


def read_test_labels(cfg: Config) -> pd.Series | None:
    """Private test labels by id (`data.test_labels`, the demo's), or None where there are none."""
    if not cfg.data.test_labels or not cfg.data_path(cfg.data.test_labels).exists():
        return None
    t = read_table(cfg.data_path(cfg.data.test_labels))
    return t.set_index(cfg.data.id_col)[cfg.data.label_col]


def private_score(cfg: Config, ids: np.ndarray, probs: np.ndarray, classes: list) -> float | None:
    """The metric against the private test labels (`data.test_labels`, the demo's), or None."""
    labels = read_test_labels(cfg)
    if labels is None:
        return None
    names = [str(c) for c in classes]
    return score(cfg.eval.metric, np.array([names.index(str(labels[i])) for i in ids]), probs)


def read_sample_submission(cfg: Config) -> pd.DataFrame:
    path = cfg.data_path(cfg.data.sample_submission)
    if not path.is_file():
        raise PipelineError(f"sample submission not found: {path} (config data.sample_submission)")
    sub = read_table(path)
    if sub.shape[1] < 2:
        raise PipelineError(f"{path}: needs an id column and at least one prediction column, has {list(sub.columns)}")
    if sub.columns[0] != cfg.data.id_col:
        raise PipelineError(f"{path}: first column is '{sub.columns[0]}', expected the id column '{cfg.data.id_col}'")
    dup = sub.iloc[:, 0][sub.iloc[:, 0].duplicated()].unique()
    if len(dup):
        raise PipelineError(f"{path}: {len(dup)} duplicate id(s): {_first(dup)}")
    return sub


# ----------------------------------------------------------------------------- stage 1 output
def read_folds(cfg: Config) -> tuple[pd.DataFrame, list]:
    """The folds table (id, label, [group], path, fold, y) and the class list, as stage 1 wrote them."""
    from .artifacts import read_json

    if not cfg.folds_csv.exists() or not cfg.folds_record.exists():
        raise PipelineError(f"folds file {cfg.folds_csv} not found: run stage 1 first (./run.sh folds)")
    rec = read_json(cfg.folds_record)
    classes = rec["classes"]
    df = read_table(cfg.folds_csv)
    df["fold"] = pd.to_numeric(df["fold"], errors="coerce")
    if df["fold"].isna().any():
        raise PipelineError(f"{cfg.folds_csv}: the fold column holds non-numbers (a damaged folds file: re-run "
                            f"./run.sh folds --force)")
    df["fold"] = df["fold"].astype(int)
    df["label"] = _normalise_labels(df["label"])
    df["y"] = encode(df["label"], classes, str(cfg.folds_csv))
    if set(df["fold"].unique()) != set(range(rec["n_splits"])):
        raise PipelineError(f"{cfg.folds_csv}: fold column does not hold folds 0..{rec['n_splits'] - 1}")
    return df, classes
