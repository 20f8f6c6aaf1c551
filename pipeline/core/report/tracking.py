"""Optional experiment trackers: MLflow (local file store), TensorBoard, Weights & Biases.

Off by default (`train.tracker: none`). Stage 2 logs each fold's epochs (one tracker run per fold, the
resolved config as its parameters). With W&B, stages 3-5 also log their tables (the stage-3 variant
table, the stage-4 TTA table, the ensemble table) and the final CV to one run per experiment, named
"summary". W&B runs offline (files under the tracking folder, `wandb sync` later) when there is no
network or no API key, and `WANDB_MODE` is respected. When a tracker is chosen but its package is not
installed, the stage goes on without it after one warning: the files under runs/ remain the record.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, flatten

log = logging.getLogger("pipeline")


@dataclass(frozen=True)
class Tracking:
    """Where an experiment's tracker runs go, resolved from the config once (`of`): the backend (train.tracker),
    its folder, the experiment's name and the resolved config (the runs' parameters)."""
    backend: str
    where: Path
    experiment: str
    config: dict

    @classmethod
    def of(cls, cfg: Config) -> "Tracking":
        return cls(cfg.train.tracker, Path(cfg.train.tracker_dir or cfg.run_dir.tracking).resolve(), cfg.experiment,
                   cfg.to_dict())


class Tracker:
    """One fold's run in the tracker: the config as parameters, each epoch's numbers as metrics."""

    def __init__(self, tr: Tracking, fold: int | str):
        name = f"fold{fold}" if isinstance(fold, int) else fold  # "full": the full-data model
        self.backend, self._run, self._writer = tr.backend, None, None
        where = tr.where
        params = {k: str(v)[:250] for k, v in flatten(tr.config).items()}
        try:
            if self.backend == "mlflow":
                import mlflow

                mlflow.set_tracking_uri(where.as_uri())
                mlflow.set_experiment(tr.experiment)
                self._run = mlflow.start_run(run_name=name)
                mlflow.log_params({**params, "fold": fold})
                self._mlflow = mlflow
            elif self.backend == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(where / name))
                self._writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in params.items()))
            elif self.backend == "wandb":
                self._run = wandb_run(tr, name, "train")
        except ImportError as e:
            log.warning("train.tracker=%s but it is not installed (%s): training goes on without it",
                        self.backend, e)
            self.backend = "none"

    def log(self, row: dict, step: int) -> None:
        values = {k: float(v) for k, v in row.items()
                  if isinstance(v, (int, float)) and k != "epoch" and math.isfinite(float(v))}
        if self.backend == "mlflow":
            self._mlflow.log_metrics(values, step=step)
        elif self.backend == "tensorboard":
            for k, v in values.items():
                self._writer.add_scalar(k, v, step)
        elif self.backend == "wandb":
            self._run.log(values, step=step)

    def close(self) -> None:
        if self.backend == "mlflow":
            self._mlflow.end_run()
        elif self.backend == "tensorboard":
            self._writer.close()
        elif self.backend == "wandb":
            self._run.finish()


# ----------------------------------------------------------------------------- Weights & Biases
def wandb_online() -> bool:
    """An API key (environment or ~/.netrc) and api.wandb.ai reachable within 2 s."""
    netrc = Path.home() / ".netrc"
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
    if not has_key:
        return False
    try:
        socket.create_connection(("api.wandb.ai", 443), timeout=2).close()
        return True
    except OSError:
        return False


def wandb_run(tr: Tracking, name: str, job: str):
    """A W&B run of this experiment (group = experiment; resumable by a stable id, so stages run in
    separate processes add to the same run)."""
    import wandb

    tr.where.mkdir(parents=True, exist_ok=True)
    mode = os.environ.get("WANDB_MODE") or ("online" if wandb_online() else "offline")
    key = f"{tr.experiment}-{name}"
    run_id = re.sub(r"[^A-Za-z0-9_-]", "-", key)[:48] + "-" + hashlib.sha256(key.encode()).hexdigest()[:8]
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "pipeline"), group=tr.experiment,
                      name=f"{tr.experiment} {name}", id=run_id, resume="allow", dir=str(tr.where), mode=mode,
                      job_type=job, config=tr.config)


def report(tr: Tracking, stage: str, table, values: dict) -> None:
    """Stages 3-5: a result table and headline numbers into the experiment's "summary" W&B run
    (only with train.tracker=wandb; MLflow and TensorBoard log stage 2)."""
    if tr.backend != "wandb":
        return
    try:
        import wandb

        run = wandb_run(tr, "summary", stage)
    except ImportError as e:
        log.warning("train.tracker=wandb but it is not installed (%s): the %s table stays in runs/ only", e, stage)
        return
    run.log({f"{stage}/table": wandb.Table(dataframe=table)})
    run.summary.update({f"{stage}/{k}": v for k, v in values.items()})
    run.finish()
