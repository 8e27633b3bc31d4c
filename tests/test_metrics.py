"""CA, ASR, RA and alarm metrics on hand-made predictions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cbpt.metrics import (
    attack_success_rate,
    auroc,
    clean_accuracy,
    evaluate_predictions,
    robust_accuracy,
    threshold_at_fpr,
    tpr_at_threshold,
)


def test_clean_accuracy():
    assert clean_accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == pytest.approx(0.75)


def test_asr_and_ra_ignore_images_of_the_target_class():
    labels = [0, 0, 1, 1, 2, 2]  # target is 2: the last two are excluded
    pred = [2, 0, 2, 2, 2, 1]
    assert attack_success_rate(pred, labels, target=2) == pytest.approx(3 / 4)
    assert robust_accuracy(pred, labels, target=2) == pytest.approx(1 / 4)


def test_evaluate_predictions_is_json_serialisable():
    ev = evaluate_predictions([0, 1, 1], [0, 1, 0], [2, 2, 1, 2], [0, 1, 1, 2], target=2)
    d = json.loads(json.dumps(ev.to_dict()))
    assert d == {
        "ca": pytest.approx(2 / 3),
        "asr": pytest.approx(2 / 3),
        "ra": pytest.approx(1 / 3),
        "n_clean": 3,
        "n_triggered": 3,
    }


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        clean_accuracy([0, 1, 2], [0, 1])


def test_auroc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    neg, pos = rng.normal(0, 1, 200), rng.normal(1, 1, 150)
    neg[:10] = pos[:10]  # ties count half
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert auroc(neg, pos) == pytest.approx(pairwise, abs=1e-12)
    assert auroc([0, 1], [2, 3]) == 1.0 and auroc([2, 3], [0, 1]) == 0.0


def test_threshold_at_one_percent_fpr():
    neg = np.arange(1000, dtype=float)
    t = threshold_at_fpr(neg, 0.01)
    assert (neg > t).mean() <= 0.01 and (neg >= t).mean() > 0.01
    assert tpr_at_threshold([t - 1, t, t + 1, t + 2], t) == 0.5
