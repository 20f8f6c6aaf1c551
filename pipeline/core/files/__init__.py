"""Files on disk: where every output lives, how it is written, and what it was made from.

- `layout`: every path under folds/, runs/, submissions/, reports/, exports/ (FoldDir, RunDir, BundleDir).
- `artifacts`: atomic writes (write_json, write_npz, write_csv, atomic_path), reads, hashes, the experiment lock.
- `provenance`: each stage's record (train_record, rebalance_record, infer_record, ...), staleness (stale_reasons,
  refuse_stale) and the image-file snapshots behind them.
- `units`: every unit of an experiment declared once (its record, deps, refusals) and the one engine deriving
  each stage's status, the refusal of a stale input (`require`) and the order of the units.
- `bundle`: the export bundle's manifest and its verification.
- `teachers`: a teacher's files (load_teacher: the ensemble or experiment it is) and its record (teacher_record).
- `featurefile`: stage 4's feature files, written with what checks them and read checked (write_features,
  CheckedFeatures, damage).

Nothing is imported here: `from pipeline.core.files import layout` loads that module alone.
"""
