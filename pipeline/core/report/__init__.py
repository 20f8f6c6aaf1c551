"""What a run shows: progress lines, report pictures, optional experiment trackers.

- `progress`: progress of long loops on a terminal and in log files alike.
- `plots`: one PNG per function (training curves, confusion, recall vs frequency, ...).
- `tracking`: MLflow / TensorBoard / W&B (offline), when installed.

Nothing is imported here: `from pipeline.core.report import plots` loads that module alone.
"""
