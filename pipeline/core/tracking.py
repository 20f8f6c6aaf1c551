"""Optional experiment-tracker logging of stage 2 (MLflow local file store or TensorBoard).

Off by default (`train.tracker: none`). When a tracker is chosen but its package is not installed,
training goes on without it after one warning: the files under runs/ remain the record.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

from .config import Config, flatten

log = logging.getLogger("pipeline")


class Tracker:
    """One fold's run in the tracker: the config as parameters, each epoch's numbers as metrics."""

    def __init__(self, cfg: Config, fold: int):
        self.backend, self._run, self._writer = cfg.train.tracker, None, None
        where = Path(cfg.train.tracker_dir or cfg.run.tracking).resolve()
        params = {k: str(v)[:250] for k, v in flatten(cfg.to_dict()).items()}
        try:
            if self.backend == "mlflow":
                import mlflow

                mlflow.set_tracking_uri(where.as_uri())
                mlflow.set_experiment(cfg.experiment)
                self._run = mlflow.start_run(run_name=f"fold{fold}")
                mlflow.log_params({**params, "fold": fold})
                self._mlflow = mlflow
            elif self.backend == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(where / f"fold{fold}"))
                self._writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in params.items()))
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

    def close(self) -> None:
        if self.backend == "mlflow":
            self._mlflow.end_run()
        elif self.backend == "tensorboard":
            self._writer.close()
