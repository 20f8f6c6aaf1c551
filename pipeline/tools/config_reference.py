"""The config reference (docs/config.md), generated from the schema in core/config.py: every key with its type,
default, range, the first stage whose outputs it changes, and its help.

Usage:   python -m pipeline.tools.config_reference > docs/config.md
tests/test_config.py fails when docs/config.md differs from what this prints (a key added without
regenerating it).
"""
from __future__ import annotations

import typing

from ..core.config import (PRETRAINED_DEFAULTS, RENAMED, SHORT_FINE_TUNE_DEFAULTS, SHORT_FINE_TUNE_EPOCHS, schema,
                           section_help)

INTRO = """A YAML file is an experiment sheet; `base: other.yaml` extends another file (keys merge one by one);
`key=value` on the command line comes last. Unknown keys (with a "did you mean"), wrong types and out-of-range
values are errors naming the key and the file that set it, all of them at once (with `all` and the stage commands,
in one list with the plan's problems: data, model, weights, members). A key given twice in one file is an error naming both
lines (plain YAML keeps the second silently); an empty or over-1-MB config file is refused. Names that become paths
(`experiment`, `ensemble.name`, `folds.name`, report and export names) are one plain path component: no `/`, `\\`,
`:`, leading `.`, `-` or `~`. YAML 1.1 quirks are handled: `cache: off` is the choice "off", `lr: 1e-3` a number.
`runs/<exp>/config.yaml` and every stage record hold the resolved values."""

STAGE_WORDS = {"setup": "setup", "1": "1+", "2": "2+", "3": "3+", "4": "4+", "5": "5", "-": "none"}


def _type(t) -> str:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Literal:
        return " \\| ".join(str(a) for a in args)
    if origin is typing.Union or type(t).__name__ == "UnionType":
        inner = [a for a in args if a is not type(None)]
        return f"{_type(inner[0])} or null"
    if origin is list:
        return f"list of {_type(args[0])}"
    return getattr(t, "__name__", str(t))


def _range(r) -> str:
    if r is None:
        return ""
    lo, hi, lo_in, hi_in = r
    num = lambda x: str(int(x)) if float(x).is_integer() else f"{x:g}"  # noqa: E731
    return f"{'[' if lo_in else '('}{num(lo)}, {num(hi)}{']' if hi_in else ')'}"


def _default(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list) and len(str(v)) > 40:
        return f"{len(v)} values, {v[0]} .. {v[-1]}"
    return f"`{v}`" if v != "" else '`""`'


def _md(text: str) -> str:
    return text.replace("|", "/").replace("<", "&lt;").replace(">", "&gt;")


def reference() -> str:
    sections = section_help()
    lines = ["# Config reference", "",
             "Generated from the schema in `pipeline/core/config.py` by `python -m pipeline.tools.config_reference`;",
             "do not edit (a test fails when this page and the schema differ).", "", INTRO, "",
             "*Stage*: the first stage whose outputs the key changes (2+: stages 2-5 re-run when it changes; setup: "
             "how the competition folder is built; none: where or how work runs, not what it computes). *Added*: "
             "keys added after outputs existed are left out of records at their default, so an upgrade keeps "
             "finished work."]
    current = None
    for k in schema():
        sec = k.name.rpartition(".")[0]
        if sec != current:
            current = sec
            title = f"`{sec}`" if sec else "top level"
            lines += ["", f"## {title}", ""]
            if sections.get(sec):
                lines += [_md(sections[sec]), ""]
            lines += ["| key | type | default | range | stage | added | what it is |", "|---|---|---|---|---|---|---|"]
        name = k.name.rpartition(".")[2]
        lines.append(f"| `{name}` | {_type(k.type)} | {_default(k.default)} | {_range(k.range)} | "
                     f"{STAGE_WORDS[k.stage]} | {k.added or ''} | {_md(k.help)} |")
    lines += ["", "## Defaults of a fine-tune", "",
              "With `model.pretrained` or `model.pretrained_path` set, keys the files and command line leave unset "
              "take these values (`config.PRETRAINED_DEFAULTS`, measured in benchmarks/pretrained.py):", ""]
    lines += [f"- `{k}`: {v}" for k, v in PRETRAINED_DEFAULTS.items()]
    lines += ["", f"With pretrained weights and a short fine-tune (1 <= `train.epochs` <= {SHORT_FINE_TUNE_EPOCHS}), "
              "keys left unset also take these (`config.SHORT_FINE_TUNE_DEFAULTS`: twice the optimiser steps for the "
              "same images seen, #47):", ""]
    lines += [f"- `{k}`: {v}" for k, v in SHORT_FINE_TUNE_DEFAULTS.items()]
    lines += ["", "And with any epoch count:", ""]
    lines += ["- `rebalance.probe`: every variant of `rebalance.variants` (the same heads also fit on the frozen "
              "pretrained features, for the nested best head to choose from), except with `train.epochs: 0` (the "
              "fold heads are the probe heads there)"]
    lines += ["", "## Renamed keys", ""] + [f"- `{k}`{v}" for k, v in RENAMED.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference(), end="")
