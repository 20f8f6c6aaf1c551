#!/usr/bin/env bash
# The single entry point: ./run.sh <command> [--config FILE] [--fold K] [--force] [key=value ...]
# A thin wrapper over the `pipeline` console script (pyproject.toml; the same as `python -m pipeline`),
# run in this folder (the project folder); on first use it creates a virtual environment with the
# pinned versions of requirements-lock.txt and reuses it while that file is unchanged.
#
# Environment:
#   PIPELINE_VENV=DIR    where the environment lives (default: .venv in this folder)
#   PIPELINE_NO_VENV=1   use the python already on PATH (e.g. your own CUDA torch); no install
#   PYTHON=python3.11    the interpreter that creates the environment (default: python3)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

if [[ "${PIPELINE_NO_VENV:-0}" == "1" ]]; then
  py="${PYTHON:-python3}"
else
  venv="${PIPELINE_VENV:-$here/.venv}"
  py="$venv/bin/python"
  want="$(cat requirements-lock.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
  stamp="$venv/.pipeline-lock"
  if [[ ! -x "$py" || ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    echo "setting up the environment in $venv (pinned versions; takes a few minutes once)" >&2
    [[ -x "$py" ]] || "${PYTHON:-python3}" -m venv "$venv"
    "$py" -m pip install --disable-pip-version-check -q -r requirements-lock.txt
    "$py" -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
    echo "$want" > "$stamp"
  fi
fi

cmd="${1:-help}"
case "$cmd" in
  test)
    shift
    if [[ "${PIPELINE_NO_VENV:-0}" != "1" ]]; then
      # the test-only packages (requirements-test.txt), with their own stamp
      want_test="$(sha256sum requirements-test.txt | cut -d' ' -f1)"
      stamp_test="$venv/.pipeline-test"
      if [[ ! -f "$stamp_test" || "$(cat "$stamp_test")" != "$want_test" ]]; then
        "$py" -m pip install --disable-pip-version-check -q --no-deps -r requirements-test.txt
        echo "$want_test" > "$stamp_test"
      fi
    fi
    exec "$py" -m pytest "$@" ;;
  *)
    script="$(dirname "$py")/pipeline"
    if [[ "${PIPELINE_NO_VENV:-0}" != "1" && -x "$script" ]]; then
      exec "$script" "$@"
    fi
    exec "$py" -m pipeline "$@" ;;
esac
