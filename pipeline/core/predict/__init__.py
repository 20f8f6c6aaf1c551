"""Predictions and their scores: TTA views, applying members to images, metrics, ensembles, submissions.

- `tta`: small named views (orig, hflip, ...) and how their outputs merge.
- `inference`: TTA at each scale on every head, fold means, the policy's probabilities.
- `stored`: the stages' stored predictions as later readers get them (Stage4: one head's rows, a view's logits,
  the policy's or the no-TTA probabilities; HeldOut: a fold's stage-2/3 held-out logits).
- `metrics`: every metric on labels and probabilities or per-row scores (RowScores), CV over folds.
- `priors`: test-time class priors (EM, BBSE), their likelihood-ratio test and the honest shift report.
- `submission`: member names (Member), ensemble combination, the submission table and its checks.

Nothing is imported here: `from pipeline.core.predict import metrics` loads that module alone.
"""
