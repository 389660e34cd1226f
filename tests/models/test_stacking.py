"""The stacked hybrid: a meta-learner over base models' out-of-fold probabilities, chosen on
grouped inner folds and scored nested (never on a row that fitted it)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from neuroblastoma_cnn.core.errors import ParameterError
from neuroblastoma_cnn.models.stacking import StackedHybrid, nested_oof

CLASSES = ["a", "b", "c", "d"]
META = {"logistic": {"C": [0.1, 1.0]}, "boosting": {"learning_rate": [0.1], "max_iter": [30]}}


def _bases(n: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Base 'cnn' tells a from b (and guesses between c and d), base 'floor' the reverse."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 4, n)
    groups = np.asarray([f"g{i // 4}" for i in range(n)])
    out = {}
    for name, knows in (("cnn", (0, 1)), ("floor", (2, 3))):
        logits = rng.normal(0, 0.5, (n, 4))
        for i, t in enumerate(truth):
            if t in knows:
                logits[i, t] += 2.5
            else:  # it only knows the pair the class belongs to
                logits[i, [c for c in range(4) if c not in knows]] += 2.0
        out[name] = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return out, np.asarray(CLASSES)[truth], groups


def test_the_hybrid_beats_each_base_out_of_fold() -> None:
    base, labels, groups = _bases(240, 0)
    folds = np.asarray([int(g[1:]) % 4 for g in groups])
    prob = nested_oof(lambda: StackedHybrid(["cnn", "floor"], META, 3), base, labels, groups,
                      folds, CLASSES)
    hybrid = f1_score(labels, np.asarray(CLASSES)[prob.argmax(1)], average="macro")
    for name, p in base.items():
        alone = f1_score(labels, np.asarray(CLASSES)[p.argmax(1)], average="macro")
        assert hybrid >= alone + 0.1, (name, alone, hybrid)
    np.testing.assert_allclose(prob.sum(axis=1), 1.0)


def test_nested_scoring_never_fits_on_the_rows_it_scores() -> None:
    base, labels, groups = _bases(80, 1)
    folds = np.asarray([int(g[1:]) % 4 for g in groups])
    fitted_on: list[set[int]] = []

    class Spy(StackedHybrid):
        def fit(self, base_prob, labels, groups):
            rows = base_prob["cnn"][:, 0]
            fitted_on.append({int(np.flatnonzero(base["cnn"][:, 0] == r)[0]) for r in rows})
            return super().fit(base_prob, labels, groups)

    nested_oof(lambda: Spy(["cnn", "floor"], {"logistic": {"C": [1.0]}}, 2), base, labels,
               groups, folds, CLASSES)
    assert len(fitted_on) == 4
    for fold, rows in enumerate(fitted_on):
        assert not rows & set(np.flatnonzero(folds == fold).tolist())


@pytest.mark.parametrize(("bases", "meta", "message"), [
    (["cnn"], META, r"stack two or more"),
    (["cnn", "floor"], {"forest": {}}, r"meta-learners \['forest'\]"),
])
def test_a_bad_hybrid_is_one_line(bases, meta, message) -> None:
    with pytest.raises(ParameterError, match=message) as info:
        StackedHybrid(bases, meta, 3)
    assert "\n" not in str(info.value)


def test_the_blend_is_a_weighted_mean_that_can_fall_back_to_one_base() -> None:
    base, labels, groups = _bases(120, 2)
    only_cnn = StackedHybrid(["cnn", "floor"], {"blend": {"weight": [1.0]}}, 2).fit(
        base, labels, groups)
    np.testing.assert_allclose(only_cnn.predict_proba(base), base["cnn"], atol=1e-3)
    mean = StackedHybrid(["cnn", "floor"], {"blend": {"weight": [0.5]}}, 2).fit(
        base, labels, groups)
    expected = (base["cnn"] + base["floor"]) / 2
    np.testing.assert_allclose(mean.predict_proba(base), expected / expected.sum(1, keepdims=True),
                               atol=1e-3)
    # Chosen on inner folds among the learners: a blend is one candidate like the others.
    chosen = StackedHybrid(["cnn", "floor"], {**META, "blend": {"weight": [0.0, 0.5, 1.0]}},
                           3).fit(base, labels, groups)
    assert chosen.chosen_[0] in {"logistic", "boosting", "blend"}


def test_blend_weights_outside_zero_one_are_one_line() -> None:
    from _params import params  # noqa: PLC0415

    with pytest.raises(ParameterError, match=r"meta\.blend\.weight = \[1\.5\]: must be between"):
        params("select_model", hybrid={"bases": ["resnet34", "selected_floor"], "inner_folds": 2,
                                        "meta": {"blend": {"weight": [0.5, 1.5]}}})
    with pytest.raises(ParameterError, match=r"meta\.logistic\.C = \[0\.0\]: must be above 0"):
        params("select_model", hybrid={"bases": ["resnet34", "selected_floor"], "inner_folds": 2,
                                        "meta": {"logistic": {"C": [0.0]}}})
