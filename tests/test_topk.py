"""Top-k metrics (eval.metric: top_k_accuracy, map_at_k) and top-k submissions (ensemble.submission: topk)."""
import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.core.predict.metrics import GREATER_IS_BETTER, compute, score, top_k
from pipeline.core.predict.submission import build_submission, submission_without_sample


def brute_order(p: np.ndarray) -> list[int]:
    """Classes by probability, best first, ties by class index: the order a top-k submission lists them."""
    return sorted(range(len(p)), key=lambda c: (-p[c], c))


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(12), 300)
    probs[:40] = np.round(probs[:40], 1)            # many exact ties
    probs[40:50] = 1 / 12                           # every class tied
    y = rng.integers(0, 12, 300)
    y[50:80] = probs[50:80].argmax(1)               # some rows right at the top
    return y, probs


@pytest.mark.parametrize("k", [1, 3, 5, 12])
def test_top_k_metrics_equal_a_brute_force_computation(data, k):
    y, probs = data
    places = [brute_order(p).index(t) + 1 for p, t in zip(probs, y)]
    assert score(f"top_k_accuracy@{k}", y, probs) == pytest.approx(np.mean([r <= k for r in places]), abs=1e-12)
    assert score(f"map_at_k@{k}", y, probs) == pytest.approx(np.mean([1 / r if r <= k else 0 for r in places]),
                                                             abs=1e-12)
    assert top_k(probs, k).tolist() == [brute_order(p)[:k] for p in probs]
    if k == 1:  # top-1 is accuracy where nothing ties
        free = np.arange(50, 300)
        assert score("top_k_accuracy@1", y[free], probs[free]) == score("accuracy", y[free], probs[free])
    m = compute(y, probs, np.full(12, 50), metric=f"map_at_k@{k}")
    assert m["score"] == m[f"map_at_k@{k}"] and GREATER_IS_BETTER[f"map_at_k@{k}"]


def test_the_metric_carries_its_k_everywhere_it_is_named():
    cfg = load_config(None, ["eval.metric=map_at_k", "eval.top_k=3"])
    assert cfg.eval.scorer == "map_at_k@3"
    assert load_config(None, ["eval.metric=macro_f1"]).eval.scorer == "macro_f1"
    with pytest.raises(ValueError, match="needs its k"):
        score("map_at_k", np.zeros(2, int), np.full((2, 3), 1 / 3))
    with pytest.raises(PipelineError, match="eval.top_k"):
        load_config(None, ["eval.top_k=0"])


def test_a_topk_submission_lists_k_labels_best_first_in_the_sample_column():
    classes = [1000, 1003, 1007, 1010]
    probs = np.array([[0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25], [0.0, 0.1, 0.3, 0.6]])
    sample = pd.DataFrame({"Id": ["a", "b", "c"], "Predicted": "x"})
    sub = build_submission(sample, np.array(["a", "b", "c"]), probs, classes, "topk", "label", "sample.csv", k=3)
    assert list(sub.columns) == ["Id", "Predicted"]                         # the sample's column name kept
    assert sub["Predicted"].tolist() == ["1003 1007 1000", "1000 1003 1007", "1010 1007 1003"]
    free = submission_without_sample(np.array(["a", "b", "c"]), probs, classes, "topk", "Id", "predictions", k=2)
    assert free.columns.tolist() == ["Id", "predictions"] and free["predictions"][2] == "1010 1007"
    with pytest.raises(PipelineError, match="one prediction column"):
        build_submission(sample.assign(more=1), np.array(["a", "b", "c"]), probs, classes, "topk", "label", "s.csv")
