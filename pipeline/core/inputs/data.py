"""The competition data contract: reading and validating train/test tables, label encoding, images.

Three train layouts are accepted (config `data.layout`):
- csv: `train.csv` with an id column (a path relative to `train_dir`, extension optional via
  `data.image_ext`), a label column and optionally a group column;
- folders: `train_dir/<class>/*.<ext>`, the FGVC habit; ids become `<class>/<file>`;
- coco: COCO-style JSON as iNaturalist, Herbarium and FGVCx ship it (`data.train_json`): `images` (id,
  file_name relative to `data.root`), one `annotations` entry per image (image_id, category_id),
  `categories` (id, name, taxonomy); ids are the image ids, a class is the category id (or name).
Test images are the ids of `sample_submission.csv` (their order is the submission's order) or,
without one, every image file in `test_dir`, sorted; with `data.test_json` (layout coco) the images of
that JSON in its order (a sample submission, when given, fixes the order and must list the same ids).

Every check runs before any work and raises PipelineError naming the file and rows at fault.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from ..config import DataCfg
from ..errors import PipelineError
from .images import BOMB, open_image
from ..predict.metrics import score

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
def _resolve_ids(ids: pd.Series, image_dir: Path, ext: str, what: str, row=lambda i: f"row {i + 2}") -> list[Path]:
    """Map ids to files inside image_dir, refusing any id that would leave it (`row`: how an error names the
    i-th id's place in `what`)."""
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
        rows = _first(f"{row(i)}: {r}" for i, r in escaping)
        raise PipelineError(f"{what}: {len(escaping)} id(s) point outside {image_dir}: {rows}")
    if invalid:
        rows = _first(f"{row(i)}: {r}" for i, r in invalid)
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
def read_train_table(d: DataCfg) -> pd.DataFrame:
    """The validated training table with columns id, label (original values), [group], path."""
    if d.layout == "coco":
        return _checked(read_coco_train(d), str(d.path(d.train_json)), d.check_images)
    train_dir = d.path(d.train_dir)
    if not train_dir.is_dir():
        raise PipelineError(f"train image folder not found: {train_dir} (config data.root / data.train_dir)")
    if d.layout == "folders":
        df = _scan_class_folders(train_dir)
        what = str(train_dir)
    else:
        csv = d.path(d.train_csv)
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
    df["path"] = [str(p) for p in _resolve_ids(df["id"], train_dir, d.image_ext if d.layout == "csv" else "", what)]
    return _checked(df, what, d.check_images)


def _checked(df: pd.DataFrame, what: str, check_images: str) -> pd.DataFrame:
    """The checks every layout's train table passes: unique ids, two classes or more, readable image files,
    each file once."""
    dup = df["id"][df["id"].duplicated()].unique()
    if len(dup):
        raise PipelineError(f"{what}: {len(dup)} duplicate id(s): {_first(dup)}")
    n_classes = df["label"].nunique()
    if n_classes < 2:
        raise PipelineError(f"{what}: found {n_classes} class(es) {_first(df['label'].unique())}; "
                            f"classification needs at least 2")
    _check_images([Path(p) for p in df["path"]], check_images, what)
    _same_files(df, what)
    return df.reset_index(drop=True)


def fold_problems(df: pd.DataFrame, n_splits: int, grouped: bool, rare: str, where: str) -> tuple[str | None, str | None]:
    """(why the train table cannot make the folds, or None; a warning, or None): a class with fewer images than
    folds (refused with folds.rare_classes=error), fewer groups or images than folds. Stage 1 and the plan ask."""
    counts = df["label"].astype(str).value_counts()
    small = counts[counts < n_splits]
    names = ", ".join(f"{c} ({n})" for c, n in list(small.items())[:10]) + (" ..." if len(small) > 10 else "")
    if len(small) and rare == "error":
        return (f"{where}: {len(small)} class(es) with fewer images than folds ({n_splits}): {names}; lower "
                f"folds.n_splits, merge or drop them, or set folds.rare_classes=allow (some folds will then not "
                f"validate them)"), None
    if grouped and df["group"].nunique() < n_splits:
        return (f"{where}: only {df['group'].nunique()} distinct group(s) for {n_splits} folds; lower "
                f"folds.n_splits or check data.group_col"), None
    if len(df) < n_splits:
        return f"{where}: {len(df)} images cannot make {n_splits} folds", None
    warning = f"class(es) with fewer images than folds ({n_splits}), some folds will not see them: {names}"
    return None, warning if len(small) else None


def train_source(d: DataCfg) -> Path:
    """Where the train labels come from (for messages): the csv, the JSON or the class folders."""
    return d.path({"csv": d.train_csv, "coco": d.train_json}.get(d.layout, d.train_dir))


def test_source(d: DataCfg) -> str:
    """Where the test ids come from (for messages)."""
    if d.layout == "coco" and d.test_json:
        return f"the images of {d.path(d.test_json)}"
    return (f"sample submission {d.path(d.sample_submission)}" if d.sample_submission
            else f"every image of {d.path(d.test_dir)}")


# ----------------------------------------------------------------------------- layout coco
def _is_id(v) -> bool:
    """A COCO id as written: an integer or a non-empty string (not null, a boolean, a fraction, a list)."""
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, str) and v.strip() != "")


def read_json_file(path: Path, what: str) -> dict:
    if not path.is_file():
        raise PipelineError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PipelineError(f"{path}: not readable as JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise PipelineError(f"{path}: a COCO-style file needs an 'images' list (of {{id, file_name}}); it has "
                            f"{list(data)[:8] if isinstance(data, dict) else type(data).__name__}")
    return data


def coco_images(d: DataCfg, path: Path) -> pd.DataFrame:
    """The `images` of a COCO-style JSON: id (as text), path (file_name under data.root, refused when it leaves
    it), and every other field of the entries (grouping fields)."""
    data = read_json_file(path, "COCO JSON (config data.train_json / data.test_json)")
    images = data["images"]
    if not images:
        raise PipelineError(f"{path}: its 'images' list is empty: no image to read (each entry: {{id, file_name}})")
    bad = [i for i, im in enumerate(images) if not isinstance(im, dict) or "id" not in im or not im.get("file_name")]
    if bad:
        raise PipelineError(f"{path}: {len(bad)} image entr(ies) lack an id or a file_name: "
                            f"{_first(f'images[{i}]' for i in bad)}")
    bad = [f"images[{i}] (id: {json.dumps(im['id'])})" for i, im in enumerate(images) if not _is_id(im["id"])]
    bad += [f"images[{i}] (file_name: {json.dumps(im['file_name'])})" for i, im in enumerate(images)
            if not isinstance(im["file_name"], str)]
    if bad:
        raise PipelineError(f"{path}: {len(bad)} image entr(ies) whose id is not an integer or a non-empty string, "
                            f"or whose file_name is not a string: {_first(bad)}")
    df = pd.DataFrame(images)
    df["id"] = df["id"].astype(str)
    dup = df["id"][df["id"].duplicated()].unique()
    if len(dup):
        raise PipelineError(f"{path}: {len(dup)} duplicate image id(s): {_first(dup)}")
    names = df["file_name"].astype(str)
    dup = names[names.duplicated()].unique()
    if len(dup):
        raise PipelineError(f"{path}: {len(dup)} file_name(s) listed twice: {_first(dup)}")
    df["path"] = [str(p) for p in _resolve_ids(names, Path(d.root), "", str(path), lambda i: f"images[{i}]")]
    return df


def _coco_annotations(data: dict, path: Path) -> pd.DataFrame:
    """The `annotations` of a COCO train JSON as a table (image ids as text), refused when missing, without
    image_id / category_id, or with ids that are not integers or non-empty strings (named as written)."""
    anns = data.get("annotations")
    if not isinstance(anns, list) or not anns:
        raise PipelineError(f"{path}: no 'annotations' list (image_id, category_id): nothing to train on")
    bad = [i for i, a in enumerate(anns) if not isinstance(a, dict) or "image_id" not in a or "category_id" not in a]
    if bad:
        raise PipelineError(f"{path}: {len(bad)} annotation(s) lack image_id or category_id: "
                            f"{_first(f'annotations[{i}]' for i in bad)}")
    for field in ("image_id", "category_id"):  # ids as written: a null or 1.5 would become a float column
        bad = [f"annotations[{i}] ({field}: {json.dumps(a[field])})" for i, a in enumerate(anns)
               if not _is_id(a[field])]
        if bad:
            raise PipelineError(f"{path}: {len(bad)} annotation(s) with a {field} that is not an integer or a "
                                f"non-empty string: {_first(bad)}")
    ann = pd.DataFrame(anns)
    ann["image_id"] = ann["image_id"].astype(str)
    return ann


def read_coco_train(d: DataCfg) -> pd.DataFrame:
    """Layout coco: id, label (category id, or name with data.category_label=name), [group], path. Refused: an
    annotation of an unknown image or category, an image without annotation, an image annotated with two
    categories (multi-label)."""
    path = d.path(d.train_json)
    data = read_json_file(path, "train annotations (config data.root / data.train_json)")
    images = coco_images(d, path)
    ann = _coco_annotations(data, path)
    unknown = sorted(set(ann["image_id"]) - set(images["id"]))
    if unknown:
        raise PipelineError(f"{path}: {len(unknown)} annotation(s) name image ids not in 'images': {_first(unknown)}")
    cats = {str(c["id"]): c for c in data.get("categories") or [] if isinstance(c, dict) and "id" in c}
    if cats:
        stray = sorted({str(c) for c in ann["category_id"]} - set(cats))
        if stray:
            raise PipelineError(f"{path}: {len(stray)} category id(s) used by annotations are not in 'categories': "
                                f"{_first(stray)}")
    per_image = ann.groupby("image_id")["category_id"].nunique()
    multi = per_image.index[per_image > 1].tolist()
    if multi:
        raise PipelineError(f"{path}: {len(multi)} image(s) carry annotations of several categories, e.g. image id(s) "
                            f"{_first(multi)}: multi-label; {SUPPORTED}")
    ann = ann.drop_duplicates("image_id")  # several boxes of one category: one label
    missing = images["id"][~images["id"].isin(ann["image_id"])].tolist()
    if missing:
        raise PipelineError(f"{path}: {len(missing)} image(s) have no annotation: {_first(missing)} (test images "
                            f"belong in data.test_json; unlabelled ones must be left out)")
    df = images.merge(ann, left_on="id", right_on="image_id", how="left", suffixes=("", "_annotation"))
    if d.category_label == "name":
        if not cats or any("name" not in c for c in cats.values()):
            raise PipelineError(f"{path}: data.category_label=name needs 'categories' with a name for every id")
        names = pd.Series([c["name"] for c in cats.values()])
        if names.duplicated().any():
            raise PipelineError(f"{path}: category names repeat ({_first(names[names.duplicated()].unique())}): "
                                f"use data.category_label=id")
        label = df["category_id"].astype(str).map(lambda c: cats[c]["name"])
    else:
        label = df["category_id"]
    out = pd.DataFrame({"id": df["id"], "label": _normalise_labels(label.reset_index(drop=True))})
    if d.group_col:
        col = d.group_col if d.group_col in df else f"{d.group_col}_annotation"
        if col not in df:
            raise PipelineError(f"{path}: data.group_col '{d.group_col}' is neither a field of the images nor of "
                                f"the annotations (image fields: {[c for c in images.columns if c != 'path']})")
        empty = df["id"][df[col].isna()].tolist()
        if empty:
            raise PipelineError(f"{path}: {len(empty)} image(s) have no '{d.group_col}': {_first(empty)}")
        out["group"] = df[col].astype(str).values
    out["path"] = df["path"].values
    return out


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
    if pd.api.types.is_float_dtype(s) and (s == s.round()).all() and (s.abs() < 2 ** 53).all():
        return s.astype(np.int64)  # (beyond 2**53 a float is no exact integer: such labels stay text)
    txt = s.astype(str)
    fits = txt.str.len().max() <= 18  # int64 holds every integer of 18 digits; longer ids stay text
    if fits and txt.str.fullmatch(r"-?(0|[1-9][0-9]*)").all():
        return txt.astype(np.int64)
    if fits and txt.str.fullmatch(r"-?(0|[1-9][0-9]*)(\.0*)?").all():  # "1.0" and "1" are one class, as numbers are
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
def read_test_table(d: DataCfg, require_images: bool = True) -> pd.DataFrame:
    """Test ids (submission order) and image paths. Columns: id, path."""
    if d.layout == "coco" and d.test_json:
        return _coco_test_table(d, require_images)
    test_dir = d.path(d.test_dir)
    if d.sample_submission:
        sub_path = d.path(d.sample_submission)
        sub = read_sample_submission(d)
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
            check_test_folder(d, table)
        return table
    paths = [test_dir / i for i in ids]
    return pd.DataFrame({"id": ids.values, "path": [str(p) for p in paths]})


def _coco_test_table(d: DataCfg, require_images: bool) -> pd.DataFrame:
    """Layout coco with data.test_json: its images in its order, or in the sample submission's order (which must
    list the same ids)."""
    path = d.path(d.test_json)
    images = coco_images(d, path)
    if images.empty:
        raise PipelineError(f"{path}: no test images")
    table = images[["id", "path"]]
    if d.sample_submission:
        ids = read_sample_submission(d).iloc[:, 0].astype(str)
        where = d.path(d.sample_submission)
        absent, extra = sorted(set(ids) - set(table["id"])), sorted(set(table["id"]) - set(ids))
        if absent or extra:
            raise PipelineError(f"{where} and {path} list different test images: {len(absent)} id(s) only in the "
                                f"sample submission {_first(absent)}, {len(extra)} only in the JSON {_first(extra)}")
        table = table.set_index("id").loc[ids.values].reset_index()
    if require_images:
        _check_images([Path(p) for p in table["path"]], d.check_images, str(path))
    return table.reset_index(drop=True)


def check_test_folder(d: DataCfg, test: pd.DataFrame) -> None:
    """Refuse image files in the test folder that the sample submission does not list: a hidden test set
    that does not match its sample submission (a Kaggle code competition's rerun) would be scored short."""
    test_dir = d.path(d.test_dir)
    listed = {Path(p).resolve() for p in test["path"]}
    extra = sorted(f.name for f in test_dir.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTS
                   and f.resolve() not in listed)
    if extra:
        raise PipelineError(f"{test_dir}: {len(extra)} image(s) are not in the sample submission "
                            f"{d.path(d.sample_submission)}: {_first(extra)} (a truncated sample "
                            f"submission, or a test folder of another competition?)")


def read_test_labels(d: DataCfg) -> pd.Series | None:
    """Private test labels by id (`data.test_labels`, the demo's), or None where there are none."""
    if not d.test_labels or not d.path(d.test_labels).exists():
        return None
    t = read_table(d.path(d.test_labels))
    return t.set_index(d.id_col)[d.label_col]


def private_score(data: DataCfg, scorer: str, ids: np.ndarray, probs: np.ndarray, classes: list) -> float | None:
    """The metric against the private test labels (`data.test_labels`, the demo's), or None. `probs` may be a
    function returning them (read only when there are labels)."""
    labels = read_test_labels(data)
    if labels is None:
        return None
    pos = {str(c): i for i, c in enumerate(classes)}
    unknown = sorted({str(labels[i]) for i in ids} - set(pos))
    if unknown:
        raise PipelineError(f"config data.test_labels: label(s) {_first(unknown)} are not among the training classes")
    probs = probs() if callable(probs) else probs  # an array, or a table read a block of rows at a time
    return score(scorer, np.array([pos[str(labels[i])] for i in ids]), probs)


def read_sample_submission(d: DataCfg) -> pd.DataFrame:
    path = d.path(d.sample_submission)
    if not path.is_file():
        raise PipelineError(f"sample submission not found: {path} (config data.sample_submission)")
    sub = read_table(path)
    if sub.shape[1] < 2:
        raise PipelineError(f"{path}: needs an id column and at least one prediction column, has {list(sub.columns)}")
    if sub.columns[0] != d.id_col:
        raise PipelineError(f"{path}: first column is '{sub.columns[0]}', expected the id column '{d.id_col}'")
    dup = sub.iloc[:, 0][sub.iloc[:, 0].duplicated()].unique()
    if len(dup):
        raise PipelineError(f"{path}: {len(dup)} duplicate id(s): {_first(dup)}")
    return sub


# ----------------------------------------------------------------------------- stage 1 output
def read_folds(name: str) -> tuple[pd.DataFrame, list]:
    """The folds table (id, label, [group], path, fold, y) and the class list, as stage 1 wrote them (`name`: the
    folds' name, Config.folds_name)."""
    from ..files import layout
    from ..files.artifacts import read_json

    csv = layout.folds_csv(name)
    if not csv.exists() or not layout.folds_record(name).exists():
        raise PipelineError(f"folds file {csv} not found: run stage 1 first (./run.sh folds)")
    rec = read_json(layout.folds_record(name))
    classes = rec["classes"]
    df = read_table(csv)
    df["fold"] = pd.to_numeric(df["fold"], errors="coerce")
    if df["fold"].isna().any():
        raise PipelineError(f"{csv}: the fold column holds non-numbers (a damaged folds file: re-run "
                            f"./run.sh folds --force)")
    df["fold"] = df["fold"].astype(int)
    df["label"] = _normalise_labels(df["label"])
    df["y"] = encode(df["label"], classes, str(csv))
    if set(df["fold"].unique()) != set(range(rec["n_splits"])):
        raise PipelineError(f"{csv}: fold column does not hold folds 0..{rec['n_splits'] - 1}")
    return df, classes
