"""Test-time prior estimation (ensemble.prior, #48 item 2): EM and BBSE recover a shifted prior from calibrated
posteriors, leave an unshifted test set alone, and stage 5 applies, records and measures them."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.core.predict import priors
from pipeline.stages import ensemble as ens_stage
from pipeline.stages import infer as infer_stage

from test_infer_ensemble import run_a  # noqa: F401  (fixture)
from test_infer_ensemble import BASE

N_CLASSES, DIM = 6, 3


def gaussian_task(n: int, prior: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a Gaussian class mixture and their exact posteriors under the long-tailed source prior SOURCE
    (a perfectly calibrated classifier trained on the source)."""
    rng = np.random.default_rng(seed)
    y = rng.choice(N_CLASSES, n, p=prior)
    x = MU[y] + rng.normal(size=(n, DIM))
    ll = -0.5 * ((x[:, None, :] - MU[None]) ** 2).sum(2) + np.log(SOURCE)
    p = np.exp(ll - ll.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True), y


MU = np.random.default_rng(7).normal(0, 2.0, (N_CLASSES, DIM))
SOURCE = np.exp(-0.5 * np.arange(N_CLASSES)) / np.exp(-0.5 * np.arange(N_CLASSES)).sum()


@pytest.mark.parametrize("method", ["em", "bbse"])
def test_a_shifted_test_prior_is_recovered_and_applied_an_unshifted_one_is_left_alone(method):
    oof, oof_y = gaussian_task(6000, SOURCE, 0)
    source = priors.source_prior(method, oof, oof_y)
    target = SOURCE[::-1].copy()
    test, test_y = gaussian_task(3000, target, 1)
    adjusted, rec = priors.adjusted(method, test, source, oof, oof_y, 1.0)
    truth = np.bincount(test_y, minlength=N_CLASSES) / len(test_y)
    assert rec["applied"] and rec["p_value"] < 1e-6
    assert np.abs(rec["prior"] - truth).sum() < 0.25 * np.abs(source - truth).sum()
    assert np.mean(adjusted.argmax(1) == test_y) > np.mean(test.argmax(1) == test_y) + 0.05
    assert np.allclose(adjusted, priors.reweight(test, source, rec["prior"]))
    same, same_y = gaussian_task(3000, SOURCE, 2)
    kept, rec = priors.adjusted(method, same, source, oof, oof_y, 1.0)
    assert not rec["applied"] and rec["p_value"] > priors.SIGNIFICANCE
    assert np.array_equal(kept, same)


def test_em_reads_a_table_a_block_at_a_time_as_it_reads_it_whole(monkeypatch):
    test, _ = gaussian_task(500, SOURCE[::-1], 3)
    whole = priors.em_prior(test, SOURCE, 1.3)[0]
    monkeypatch.setattr(priors, "block_rows", lambda n: 7)
    assert np.allclose(priors.em_prior(test, SOURCE, 1.3)[0], whole, atol=1e-12)


def test_the_temperature_fit_undoes_an_over_confident_classifier():
    p, y = gaussian_task(4000, SOURCE, 4)
    sharp = priors.tempered(p, 0.5)  # logits doubled
    assert priors.fit_temperature(sharp, y) == pytest.approx(2.0, rel=0.1)
    assert priors.fit_temperature(p, y) == pytest.approx(1.0, rel=0.1)


def test_resampling_follows_the_target_shares_and_stays_within_each_class():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), [100, 50, 30, 20])
    target = np.array([0.1, 0.2, 0.3, 0.4])
    rows = priors.resample(y, target, rng)
    assert len(rows) == len(y)
    assert np.allclose(np.bincount(y[rows], minlength=4) / len(rows), target, atol=0.05)
    rev = priors.shifted_prior("reversed", np.array([0.5, 0.3, 0.2]), rng)
    assert rev.tolist() == [0.2, 0.3, 0.5]


@pytest.mark.parametrize("method", ["em", "bbse"])
def test_the_shift_report_gains_on_shifted_folds_and_costs_nothing_without_a_shift(method):
    p, y = gaussian_task(4500, SOURCE, 5)
    fold = np.arange(len(y)) % 3
    rows = {r["shift"]: r for r in priors.shift_report(method, p, y, fold, seed=0)}
    assert list(rows) == list(priors.SHIFTS)
    assert abs(rows["none"]["accuracy_gain"]) < 0.01
    assert rows["reversed"]["accuracy_gain"] > 0.1 and rows["reversed"]["log_loss_gain"] > 0
    assert rows["reversed"]["prior_l1_estimated"] < rows["reversed"]["prior_l1_train"]
    assert rows["reversed"]["applied_share"] == 1.0


def test_stage5_applies_records_and_measures_the_prior(run_a, monkeypatch):  # noqa: F811
    cfg = run_a
    infer_stage.run(cfg)
    plain = ens_stage.run(cfg)
    assert plain["prior"] is None
    sample = pd.read_csv(cfg.data_path("sample_submission.csv"), dtype=str)
    pd.DataFrame({"image_id": sample["image_id"], "a": 0.0, "b": 0.0, "c": 0.0}).to_csv(
        cfg.data_path("sample_submission.csv"), index=False)
    monkeypatch.setattr(priors, "SIGNIFICANCE", 1.1)  # 9 test rows never show a shift: apply whatever is found
    from test_infer_ensemble import cfg_of
    em = cfg_of(cfg.data.root, "a", "ensemble.submission=proba", "ensemble.prior=em")
    out = ens_stage.run(em)
    rec = out["prior"]
    assert rec["applied"] and [r["shift"] for r in rec["shifts"]] == list(priors.SHIFTS)
    none = ens_stage.run(cfg_of(cfg.data.root, "a", "ensemble.submission=proba"), force=True)
    before = pd.read_csv("submissions/a.csv")[["a", "b", "c"]].values
    assert none["prior"] is None
    ens_stage.run(em)  # the prior is part of the record: the submission is made again
    after = pd.read_csv("submissions/a.csv")[["a", "b", "c"]].values
    expect = priors.reweight(priors.tempered(before, rec["temperature"]), np.array(rec["train_prior"]),
                             np.array(rec["estimated"]))
    assert np.allclose(after, expect, atol=1e-6) and not np.allclose(after, before, atol=1e-3)
    from pipeline.tools.reports import experiment_page  # the experiment page shows the verdict and the shifts
    page = experiment_page.write("a").read_text()
    assert "## Test-time prior" in page and "applied" in page and "dirichlet" in page


def test_stage5_refuses_a_prior_without_oof_rows(run_a):  # noqa: F811
    from test_infer_ensemble import cfg_of
    from pipeline.core.errors import PipelineError
    cfg = cfg_of(run_a.data.root, "a", "infer.oof=off")
    infer_stage.run(cfg)
    with pytest.raises(PipelineError, match="ensemble.prior=bbse needs OOF"):
        ens_stage.run(cfg_of(run_a.data.root, "a", "infer.oof=off", "ensemble.prior=bbse"))


def test_a_prior_on_a_rank_average_is_refused_by_the_config():
    from pipeline.core.config import load_config
    from pipeline.core.errors import PipelineError
    with pytest.raises(PipelineError, match="ensemble.prior.*a rank average is not one"):
        load_config(None, ["ensemble.method=rank", "ensemble.prior=em"])
