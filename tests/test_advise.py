"""The regime advisor: LogME against its definition, the decision rule, features equal
to a run's, the first cached view reused, and the tools' output and errors."""

import json
import math
import os
import re
import shutil
import types

import numpy as np
import pytest
from conftest import ROOT, TINY_BACKBONE, tiny_config, traced, write_image_folder

from tl_keras import (advise, data, features, pilots as pilots_lib, plan as plan_lib, tasks,
                      train)
from tl_keras import transferability

SEED_WEIGHTS = os.path.join(ROOT, "benchmarks", "study", "seed_cnn_fashion0-4.weights.h5")


def _log_evidence(f, y, alpha, beta):
    """log N(y; 0, F F^T / alpha + I / beta): the evidence, computed directly."""
    n = len(y)
    cov = f @ f.T / alpha + np.eye(n) / beta
    _, logdet = np.linalg.slogdet(cov)
    return -0.5 * (n * math.log(2 * math.pi) + logdet + y @ np.linalg.solve(cov, y))


@pytest.mark.parametrize("n, d", [(60, 8), (20, 40)])  # more examples than features, and fewer
def test_logme_is_the_maximum_evidence_of_the_linear_model(n, d):
    rng = np.random.default_rng(0)
    f = rng.normal(size=(n, d))
    y = (f[:, 0] + 0.5 * rng.normal(size=n) > 0).astype("float64")
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    x2 = (u.T @ y) ** 2
    alpha, beta = transferability._fit(s ** 2, x2, float(y @ y - x2.sum()), n)
    evidence = transferability._evidence(s ** 2, x2, float(y @ y - x2.sum()), n, d)
    assert evidence == pytest.approx(_log_evidence(f, y, alpha, beta), abs=1e-6)
    for a, b in ((alpha * 1.2, beta), (alpha / 1.2, beta), (alpha, beta * 1.2),
                 (alpha, beta / 1.2)):  # a maximum: any other alpha, beta gives less
        assert _log_evidence(f, y, a, b) < evidence
    labels = y.astype("int32")
    assert transferability.logme(f, labels) == pytest.approx(
        np.mean([transferability._evidence(s ** 2, (u.T @ (labels == c)) ** 2,
                                  float((labels == c).sum() - ((u.T @ (labels == c)) ** 2).sum()),
                                  n, d) for c in (0, 1)]) / n)


def test_scores_rank_informative_features_above_noise():
    rng = np.random.default_rng(1)
    labels = np.arange(300) % 3
    informative = np.eye(3)[labels] + 0.3 * rng.normal(size=(300, 3))
    informative = np.concatenate([informative, rng.normal(size=(300, 5))], axis=1)
    noise = rng.normal(size=(300, 8))
    for score, margin in ((transferability.logme, 0.2), (transferability.h_score, 1.0)):
        assert score(advise.standardise(informative), labels) > score(
            advise.standardise(noise), labels) + margin


def _scores(**pretrained_random):
    return {cut: {"pretrained": p, "random": r, "gain": round(p - r, 4)}
            for cut, (p, r) in pretrained_random.items()}


def test_knn_accuracy_leaves_each_image_out_and_votes_its_neighbours():
    # Points on a line, labels alternating: each point's nearest others have the other label.
    line = np.arange(10.0)[:, None]
    alternating = np.arange(10) % 2
    assert transferability.knn_accuracy(line, alternating, k=1) == 0.0  # itself never counted
    apart = np.concatenate([np.arange(5.0), 100 + np.arange(5.0)])[:, None]
    assert transferability.knn_accuracy(apart, np.arange(10) >= 5, k=3) == 1.0
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 50)
    clusters = rng.normal(size=(4, 16))[labels] * 5 + rng.normal(size=(200, 16))
    assert transferability.knn_accuracy(clusters, labels) == 1.0
    noise = rng.normal(size=(200, 16))
    assert transferability.knn_accuracy(noise, labels) < 0.45  # chance is 0.25
    # Chunks of rows give what one block gives.
    assert transferability.knn_accuracy(noise, labels, chunk=7) == transferability.knn_accuracy(noise, labels)


def test_the_decision_rule():
    t = advise.Thresholds(large_examples=1000, similar_margin=0.02, scratch_margin=0.1)
    similar = _scores(early=(0.1, 0.0), late=(0.3, 0.0), top=(0.29, 0.0))
    assert advise.decide(similar, 500, t)[:5] == (
        "small_similar", "top", "pretrained", "small", "similar")
    assert advise.decide(similar, 1000, t)[0] == "large_similar"
    different = _scores(early=(0.1, 0.0), late=(0.3, 0.0), top=(0.2, 0.0))
    regime, cut, init, *_ , reasons = advise.decide(different, 500, t)
    assert (regime, cut, init) == ("small_different", "late", "pretrained")
    assert "the top cut scores 0.100 below the best cut, 'late'" in reasons
    # Pretraining adds little: large data trains from random init; small data stays frozen.
    little = _scores(early=(0.1, 0.05), late=(0.3, 0.25), top=(0.2, 0.0))
    assert advise.decide(little, 5000, t)[:3] == ("large_different", "late", "scratch")
    assert advise.decide(little, 500, t)[:3] == ("small_different", "late", "pretrained")
    # No pretrained weights at all: random init, whatever the size.
    assert advise.decide({"top": {"random": 0.1}}, 500, t)[:3] == (
        "large_different", "top", "scratch")
    # The margins are settings.
    assert advise.decide(different, 500, advise.Thresholds(similar_margin=0.2))[0] == (
        "small_similar")


@pytest.fixture(scope="module")
def digits_setup(tmp_path_factory):
    """seed_cnn pretrained by the study, on 200 digits: a plan and its datasets."""
    config = tiny_config(tmp_path_factory.mktemp("digits"), backbone="seed_cnn", image_size=28, weights=SEED_WEIGHTS,
                         dataset="digits", max_examples=200, pool_grid=1)
    config.workdir = ""
    plan = plan_lib.resolve(config)
    return plan, data.load(plan.config, plan.image_size)


def test_advice_scores_every_cut_reproducibly_from_features_equal_to_a_runs(digits_setup):
    plan, datasets = digits_setup
    advice, sample = pilots_lib.advise(plan, datasets, verbose=0)
    assert list(advice.scores) == ["early", "middle", "late", "top"]
    assert all({"pretrained", "random", "gain", "h_pretrained", "h_random", "knn_pretrained",
                "knn_random"} <= set(row)
               for row in advice.scores.values())
    assert advice.sample == sum(advice.per_class.values()) == 200 and sample.whole_view
    assert advice.regime in plan_lib.trainable.REGIMES and advice.reasons
    again, _ = pilots_lib.advise(plan, datasets, verbose=0)
    assert again.scores == advice.scores  # seeded sample, no augmentation, seeded random init

    # The advisor's features at a cut are what the run's frozen part computes there.
    for cut in ("late", "top"):
        config = plan_lib.editable(plan.config)
        config.update(cut=cut, pool_grid=advise.pool_grid_for(cut))
        model, _ = train.build(plan_lib.resolve(config), len(datasets.class_names),
                               datasets.channels)
        images, labels = zip(*((x, y) for x, y in datasets.plain_train()))
        expected = features.extractor(model).predict(np.concatenate(images), verbose=0)
        np.testing.assert_allclose(sample.features[f"pretrained/{cut}"], expected,
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(sample.labels, np.concatenate(labels))


def test_a_run_takes_the_advisors_features_as_its_first_view(digits_setup, tmp_path):
    plan, datasets = digits_setup
    model, _ = train.build(plan, len(datasets.class_names), datasets.channels)
    dim = int(features.extractor(model).output.shape[-1])
    given = np.full((200, dim), 7.0, "float32"), np.arange(200, dtype="int32") % 10
    reads = []

    class Counted:  # the training pipeline, its reads counted (each pass rebatches it first)
        def rebatch(self, n):
            reads.append(1)
            return datasets.train.rebatch(n)

    counted = types.SimpleNamespace(train=Counted(), val=datasets.val, train_examples=200,
                                    val_examples=datasets.val_examples)
    cache = features.compute(model, counted, views=2, first_view=given, verbose=0)
    assert np.all(cache.train[0] == 7.0) and not np.all(cache.train[1] == 7.0)
    np.testing.assert_array_equal(cache.train_labels[0], given[1])
    assert len(reads) == 1  # one pass over the pipeline: view 2 only
    with pytest.raises(ValueError, match=r"first_view holds features of shape \(3, "):
        features.compute(model, counted, views=1, first_view=(given[0][:3], given[1][:3]))


@pytest.mark.graph
def test_advise_tool_prints_the_table_and_writes_advice_and_a_chart(run_tool, tmp_path):
    out = tmp_path / "advice"
    result = run_tool("advise.py", "--backbone=seed_cnn", "--image_size=28",
                      f"--weights={SEED_WEIGHTS}", "--dataset=digits", "--max_examples=200",
                      "--config.advisor.sample=150", "--cuts=early,late,top,conv2,nosuch",
                      "--config.advisor.pilot_passes=0.5", f"--workdir={out}")
    assert result.returncode == 0, result.stderr
    saved = json.loads((out / "advice.json").read_text())
    assert list(saved["scores"]) == ["early", "late", "top", "conv2"]  # a layer name scores too
    assert saved["sample"] == 150 and saved["thresholds"]["similar_margin"] == 0.02
    assert "Note: cut 'nosuch' is neither a named cut point of seed_cnn" in result.stdout
    assert f"Advice: --regime={saved['regime']} --cut={saved['cut']}" in result.stdout
    assert f"Why: {saved['reasons']}." in result.stdout
    assert (out / "advice.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"python tools/finetune.py --regime={saved['regime']} --cut={saved['cut']}" in (
        result.stdout)
    # The pilots ran and decided, a progress line each; small data: no from-scratch pilot.
    finetuned = [name for name in saved["pilots"] if name.startswith("finetuned@")]
    assert list(saved["pilots"]) == ["frozen@early", "frozen@late", "frozen@top",
                                     "frozen@conv2", *finetuned] and len(finetuned) == 1
    images = saved["pilot_images"]
    assert images["train"] + images["held_out"] == 150 and 40 <= images["held_out"] <= 50
    assert saved["decided_by"] == "pilots" and (
        f"pilots on {images['train']} of the 150 sampled images" in saved["reasons"])
    for i, name in enumerate(saved["pilots"]):
        assert f"Pilot {i + 1}/5: {name}" in result.stdout
    assert images["epochs"] == 1  # pilot_passes=0.5: half the training set's worth, at least 1
    assert (f"Pilots ({images['train']} images, scored by accuracy on {images['held_out']} "
            "held out") in result.stdout
    # Nothing is overwritten.
    again = run_tool("advise.py", "--backbone=seed_cnn", "--image_size=28", "--dataset=digits",
                     f"--workdir={out}")
    assert again.returncode == 2 and "is not empty; choose another --workdir" in again.last_line()


def test_advise_tool_refuses_data_it_cannot_score(run_tool, tmp_path):
    one = tmp_path / "one"
    write_image_folder(one, classes=("cat", "dog"), per_class=4)
    shutil.rmtree(one / "dog")
    result = run_tool("advise.py", "--backbone=seed_cnn", "--image_size=28",
                      f"--weights={SEED_WEIGHTS}", f"--dataset={one}", f"--workdir={tmp_path / 'a'}")
    assert result.returncode == 2
    assert "at least 2 classes" in result.last_line() and len(result.stderr.splitlines()) <= 3
    few = tmp_path / "few"
    write_image_folder(few, classes=("cat", "dog"), per_class=1)
    result = run_tool("advise.py", "--backbone=seed_cnn", "--image_size=28",
                      f"--weights={SEED_WEIGHTS}", f"--dataset={few}", "--config.val_fraction=0.3",
                      f"--workdir={tmp_path / 'b'}")
    assert result.returncode == 2
    assert "too few images to score: the sample of" in result.last_line()
    assert "fewer than 2 of" in result.last_line()
    # A sample too small for the classes, and a backbone named twice: refused up front.
    result = run_tool("advise.py", "--backbone=seed_cnn", "--image_size=28", "--weights=none",
                      "--dataset=digits", "--max_examples=100", "--config.advisor.sample=2",
                      f"--workdir={tmp_path / 'c'}")
    assert result.last_line() == ("advise.py: error: advisor.sample=2 cannot hold 2 images of "
                                  "each of 10 classes: give at least 20")
    result = run_tool("advise.py", "--backbone=seed_cnn,seed_cnn", "--dataset=digits",
                      f"--workdir={tmp_path / 'd'}")
    assert result.last_line() == ("advise.py: error: --backbone=seed_cnn,seed_cnn names seed_cnn "
                                  "more than once")


@pytest.mark.graph
def test_finetune_auto_runs_the_advised_regime_and_records_the_advice(run_tool, tmp_path):
    work = tmp_path / "run"
    args = ("--backbone=seed_cnn", "--image_size=28", f"--weights={SEED_WEIGHTS}",
            "--dataset=digits", "--max_examples=200", "--epochs=2", "--config.verbose=0")
    result = run_tool("finetune.py", "--regime=auto", *args, f"--workdir={work}")
    assert result.returncode == 0, result.stderr
    config = json.loads((work / "config.json").read_text())
    metrics = json.loads((work / "metrics.json").read_text())
    advice = config["advice"]
    assert (config["regime"], config["cut"], config["init"], config["pool_grid"]) == (
        advice["regime"], advice["cut"], advice["init"], advice["pool_grid"])
    assert metrics["advice"] == advice and metrics["regime"] == advice["regime"]
    assert config["epochs"] == 2  # the command line's settings over the regime's file
    assert f"Advice: --regime={advice['regime']}" in result.stdout
    # 200 digits, unlike the Fashion-MNIST classes it was pretrained on: the head stays on
    # frozen layers below the top, and the advisor's features are its first cached view.
    assert (advice["regime"], advice["init"]) == ("small_different", "pretrained")
    assert "(the first from the advisor)" in result.stdout
    report = (work / "report.html").read_text()  # the pilots that decided, in the report
    assert f"scored on {advice['pilot_images']['held_out']} held out" in report
    assert all(f"<td>{name}</td>" in report for name in advice["pilots"])
    bad = run_tool("finetune.py", "--regime=auto", "--cut=late", *args,
                   f"--workdir={tmp_path / 'x'}")
    assert bad.returncode == 2
    assert bad.last_line().endswith("--regime=auto decides cut, init, pool_grid; drop cut "
                                    "or name a regime")


def test_tune_auto_sweeps_the_advised_regime(run_tool, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_tool("tune.py", "--regime=auto", "--config.advisor.pilots=false",
                      "--backbone=seed_cnn", "--image_size=28",
                      f"--weights={SEED_WEIGHTS}", "--dataset=digits", "--max_examples=200",
                      "--epochs=1", "--config.verbose=0", "--max_trials=1", f"--workdir={sweep}")
    assert result.returncode == 0, result.stderr
    config = json.loads((sweep / "sweep.json").read_text())["config"]
    assert (config["regime"], config["cut"]) == (config["advice"]["regime"],
                                                 config["advice"]["cut"])
    assert f"Advice: --regime={config['regime']} --cut={config['cut']}" in result.stdout


# --- Pilot runs --------------------------------------------------------------------------

def _pilot(strategy, cut, correct):
    """A single-label pilot right on the held-out images where `correct` is (every image's
    label is class 0)."""
    correct = np.asarray(correct, bool)
    probabilities = np.stack([correct, ~correct], axis=1).astype("float32")
    return pilots_lib.Pilot(strategy, cut, probabilities, np.zeros(len(correct), "int32"),
                            tasks.SINGLE_LABEL, 0.0)


def _pilots(**correct):
    """Pilots by name ("frozen_late" -> frozen@late, "scratch") from held-out correctness."""
    out = {}
    for key, c in correct.items():
        strategy, _, cut = key.partition("_")
        pilot = _pilot(strategy, cut, c)
        out[pilot.name] = pilot
    return out


def test_pilot_budget_and_noise():
    settings = pilots_lib.PilotSettings(passes=1.5, max_epochs=10)
    assert settings.epochs(1000, 700) == 2       # small data: 1.5 training sets' worth
    assert settings.epochs(30_000, 1400) == 10   # large data: capped
    assert pilots_lib.PilotSettings(passes=0.1).epochs(1000, 700) == 1  # at least one epoch
    # A from-scratch pilot on large data only, unless asked for always or never.
    assert [pilots_lib.PilotSettings(scratch=when).runs_scratch(size)
            for when in ("large", "always", "never") for size in ("small", "large")] == [
        False, True, True, True, False, False]
    base = np.arange(200) < 150                  # 150 of 200 right
    same = _pilot("frozen", "top", base)
    assert pilots_lib.lower_bound(same, same) == 0.0
    better = _pilot("scratch", "", np.arange(200) < 180)  # right wherever `same` is, and on 30 more
    assert pilots_lib.lower_bound(better, same) > 0.1
    one_more = _pilot("scratch", "", np.arange(200) < 151)
    assert pilots_lib.lower_bound(one_more, same) <= 0  # one image: noise
    swapped = _pilot("scratch", "", np.roll(base, 25))  # as many right, on other images
    assert pilots_lib.lower_bound(swapped, same) < 0 < pilots_lib.lower_bound(better, swapped) + 0.2


def test_the_pilots_override_the_scores_and_the_table_only_outside_their_noise():
    t = advise.Thresholds(large_examples=1000)
    sizes = {"train": 140, "held_out": 200, "epochs": 2}
    idx = np.arange(200)
    frozen = dict(frozen_early=idx < 100, frozen_top=idx < 140, frozen_late=idx < 170)
    # The scores chose top; frozen@late beats it by 30 images: the pilots move the cut.
    pilots = _pilots(**frozen, finetuned_late=idx < 172, scratch=idx < 60)
    regime, cut, init, size, similarity, reasons = pilots_lib.decide_by_pilots(
        pilots, "top", 500, sizes, t)
    assert (regime, cut, init, size, similarity) == (
        "small_different", "late", "pretrained", "small", "different")
    assert "so the table says frozen@late" in reasons
    assert "no other pilot beat it outside noise (the next best, finetuned@late 0.860, " \
           "1.0 points above it, within noise)" in reasons
    # Large data: the table's choice is the fine-tuned pilot at that cut.
    assert pilots_lib.decide_by_pilots(pilots, "top", 5000, sizes, t)[:3] == (
        "large_different", "late", "pretrained")
    # Within noise of the scores' cut, the scores' cut stays: the data counts as similar.
    close = _pilots(frozen_top=idx < 169, frozen_late=idx < 170, finetuned_top=idx < 169,
                    scratch=idx < 60)
    assert pilots_lib.decide_by_pilots(close, "top", 500, sizes, t)[:2] == ("small_similar", "top")
    # Training from scratch wins outside noise on small data: the measurement overrides.
    wins = _pilots(**frozen, finetuned_late=idx < 171, scratch=idx < 195)
    regime, cut, init, *_, reasons = pilots_lib.decide_by_pilots(wins, "top", 500, sizes, t)
    assert (regime, cut, init) == ("large_different", "top", "scratch")
    assert "scratch 0.975 beat frozen@late 0.850 by 12.5 points" in reasons
    assert reasons.endswith("so the measurement overrides the table")


LARGE = advise.Thresholds(large_examples=100)  # 200 digits count as large: a scratch pilot too


def test_a_costlier_choice_must_clear_a_margin_and_a_tie_goes_to_the_cheaper():
    """The probe's digits: fine-tuning's pilot 0.5 points above the frozen head, outside
    noise (lower bound above 0) yet within half a point: the cheaper frozen head is kept;
    without the margin, fine-tuning would win."""
    sizes = {"train": 1400, "held_out": 2000, "epochs": 3}
    idx = np.arange(2000)
    pilots = _pilots(frozen_top=idx < 1600, frozen_late=idx < 1700,
                     finetuned_late=idx < 1710)
    assert 0 < pilots_lib.lower_bound(pilots["finetuned@late"], pilots["frozen@late"]) < 0.005
    regime, cut, *_, reasons = pilots_lib.decide_by_pilots(
        pilots, "late", 500, sizes, advise.Thresholds(large_examples=1000))
    assert (regime, cut) == ("small_different", "late")
    assert re.search(r"the next best, finetuned@late 0.855, 0.5 points above it, 95% lower "
                     r"bound \+0\.\d, under the 0.5 a choice that trains more must clear: "
                     r"the cheaper is kept", reasons)
    no_margin = advise.Thresholds(large_examples=1000, costlier_margin=0.0)
    assert pilots_lib.decide_by_pilots(pilots, "late", 500, sizes, no_margin)[:2] == (
        "large_different", "late")
    # On large data the table's choice is fine-tuning: a frozen head must beat it outright.
    assert pilots_lib.decide_by_pilots(pilots, "late", 5000, sizes, advise.Thresholds(
        large_examples=1000))[:2] == ("large_different", "late")


def test_the_frozen_pilots_epochs_are_one_fit_each_image_once_per_epoch():
    x = np.arange(10, dtype="float32")[:, None]
    batches = pilots_lib._Epochs([x, 2 * x], np.arange(10), batch_size=4, epochs=3, seed=0)
    assert len(batches) == 9  # 3 epochs of 3 batches (4, 4, 2)
    epochs = [np.concatenate([batches[i][1][0] for i in range(3 * e, 3 * e + 3)])
              for e in range(3)]
    for labels in epochs:  # every image once per epoch, in its own order
        assert sorted(labels) == list(range(10))
    assert len({tuple(labels) for labels in epochs}) == 3
    for i in range(9):  # each head's inputs and labels are the same images'
        (first, second), labels = batches[i]
        assert len(labels) == 2 and np.array_equal(labels[0], labels[1])
        np.testing.assert_array_equal(first[:, 0], labels[0])
        np.testing.assert_array_equal(second, 2 * first)


def test_a_pilot_that_cannot_change_the_decision_is_not_run(monkeypatch, tmp_path):
    """A frozen head right on 299 of 300 held-out images: not even a perfect fine-tuned
    pilot could beat it by half a point outside noise, so none trains; at 270 of 300 it
    could, and it trains."""
    idx = np.arange(300)
    assert pilots_lib.cannot_change(_pilot("frozen", "top", idx < 299), 0.005)
    assert not pilots_lib.cannot_change(_pilot("frozen", "top", idx < 270), 0.005)
    vectors = np.array([[1, 0], [0, 1]] * 150, "float32")  # label vectors: mAP
    near = pilots_lib.Pilot("frozen", "top", vectors * 0.9 + 0.05, vectors,
                            tasks.get_task("multi_label"), 0.0)
    assert pilots_lib.cannot_change(near, 0.005)  # already ranks every label right
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(2), 100)
    sample = types.SimpleNamespace(labels=labels, images=None, features={
        "pretrained/top": (np.eye(2)[labels] * 4 + rng.normal(0, 0.1, (200, 2))).astype(
            "float32")})
    config = plan_lib.editable(tiny_config(tmp_path, epochs=1, learning_rate=0.05))
    trained = []
    monkeypatch.setattr(pilots_lib, "trained_pilot", lambda *a, **k: trained.append(a[4]) or (
        np.full((60, 2), 0.5, "float32")))
    with traced():  # 20 epochs of short steps: tracing them once is cheaper
        ran, sizes = pilots_lib.run_pilots(config, sample, ["a", "b"], 200,
                                           pilots_lib.PilotSettings(), ["top"], "top",
                                           scratch=False, verbose=0, margin=0.005)
    assert ran["frozen@top"].score == 1.0 and sizes["not_run"] == ["finetuned@top"]
    assert trained == [] and list(ran) == ["frozen@top"]
    regime, *_, reasons = pilots_lib.decide_by_pilots(ran, "top", 200, sizes, advise.Thresholds())
    assert regime == "small_similar" and reasons.endswith(
        "frozen@top 1.000, the only pilot run; not run: finetuned@top (a perfect score would "
        "not have beaten frozen@top by 0.5 points outside noise)")
    shown = advise.format_table(advise.Advice(
        regime, "top", "pretrained", 1, "small", "similar", reasons,
        {"top": {"pretrained": 0.5, "random": 0.1, "h_random": 1.0}}, 200, {}, 200, {},
        pilots={"frozen@top": {"accuracy": 1.0, "seconds": 1.0}}, pilot_images=sizes))
    assert "scored by accuracy on 60 held out; 'pilot' above: a frozen head there): " \
           f"{sizes['epochs']} epochs finetuned@top not run" in shown
    with traced():
        ran, sizes = pilots_lib.run_pilots(config, sample, ["a", "b"], 200,
                                           pilots_lib.PilotSettings(), ["top"], "top",
                                           scratch=False, verbose=0, margin=None)
    assert trained == ["finetuned"] and "not_run" not in sizes


@pytest.fixture(scope="module")
def piloted(digits_setup):
    plan, datasets = digits_setup
    with traced():  # many short fits: tracing each once is cheaper than running them eagerly
        return pilots_lib.advise(plan, datasets, verbose=0, pilots=pilots_lib.PilotSettings(),
                                 thresholds=LARGE)


def test_pilots_are_short_real_runs_scored_on_held_out_images(digits_setup, piloted):
    plan, datasets = digits_setup
    advice, sample = piloted
    frozen_cut = next(n for n in advice.pilots if n.startswith("finetuned@")).split("@")[1]
    assert list(advice.pilots) == ["frozen@early", "frozen@middle", "frozen@late",
                                   "frozen@top", f"finetuned@{frozen_cut}", "scratch"]
    assert advice.decided_by == "pilots" and advice.strategy() in advice.pilots
    images = advice.pilot_images
    per_class = np.bincount(sample.labels)
    held_per_class = [max(1, round(0.3 * n)) for n in per_class]  # 30% of each class
    assert images["train"] + images["held_out"] == advice.sample == 200
    assert images["held_out"] == sum(held_per_class)
    assert images["epochs"] == round(2 * 200 / images["train"])  # 2 training sets' worth
    # The pilots' split: stratified, disjoint, by seed.
    train, held = pilots_lib.pilot_split(sample.labels, 0.3, plan.config.seed)
    assert not set(train) & set(held) and len(train) + len(held) == 200
    assert np.bincount(sample.labels[held]).tolist() == held_per_class


@pytest.mark.slow
def test_pilots_give_the_same_result_with_the_same_seed(digits_setup, piloted):
    plan, datasets = digits_setup
    advice, _ = piloted
    again, _ = pilots_lib.advise(plan, datasets, verbose=0, pilots=pilots_lib.PilotSettings(),
                             thresholds=LARGE)
    assert again.pilots.keys() == advice.pilots.keys()
    assert all(again.pilots[n]["accuracy"] == p["accuracy"] for n, p in advice.pilots.items())
    assert advice.metric == "accuracy"
    assert (again.regime, again.cut, again.init) == (advice.regime, advice.cut, advice.init)


@pytest.mark.graph
def test_the_finetuned_pilot_starts_from_the_frozen_pilots_head(digits_setup, piloted,
                                                                monkeypatch):
    plan, datasets = digits_setup
    _, sample = piloted
    # feature_norm's statistics are the sample's features' at the cut: no second pass.
    monkeypatch.setattr(features, "sample", lambda *a, **k: pytest.fail("a second pass"))
    split = pilots_lib.pilot_split(sample.labels, 0.3, plan.config.seed)
    features_late = sample.features["pretrained/late"]
    frozen, head = pilots_lib.frozen_pilot(features_late, sample.labels, split, plan.config, 10)
    config = plan_lib.editable(plan.config)
    config.finetune_learning_rate = 1e-12  # everything trains, but nothing moves
    same = pilots_lib.trained_pilot(config, sample, split, datasets.class_names, "finetuned",
                                    "late", 1, head)
    # The same predictions as the frozen head's: a new random head would not give them.
    np.testing.assert_array_equal(same.argmax(axis=1), frozen.argmax(axis=1))
    np.testing.assert_allclose(same, frozen, atol=1e-4)
    held_labels = sample.labels[split[1]]
    assert tasks.SINGLE_LABEL.score(frozen, held_labels) > 0.5  # 10 classes: chance is 0.1


@pytest.mark.slow  # ~10 s: Fashion-MNIST read, the seed network's pilots
def test_the_advisor_calls_the_pretraining_task_itself_similar():
    """The `top` case: seed_cnn pretrained on Fashion-MNIST classes 0-4, advised on 300
    other images of those classes -- the pretraining data's own distribution, where the
    last layer's features fit best. Neither the scores nor the pilots call it different."""
    from tl_keras import arrays
    from tl_keras.configs import base

    _, _, x_val, y_val, names = arrays.load_builtin("fashion_mnist")
    keep = np.flatnonzero(y_val < 5)[:300]
    examples = data.from_arrays(x_val[keep], y_val[keep], class_names=names[:5])
    config = base.get_config()
    config.update(backbone="seed_cnn", image_size=28, weights=SEED_WEIGHTS, augment=False,
                  workdir="")
    plan = plan_lib.resolve(config)
    datasets = data.make_datasets(examples, plan.config, plan.image_size)
    advice, _ = pilots_lib.advise(plan, datasets, verbose=0, pilots=pilots_lib.PilotSettings())
    assert (advice.regime, advice.cut, advice.similarity) == (
        "small_similar", "top", "similar"), advice.reasons
    assert advise.decide(advice.scores, advice.train_examples)[:2] == (  # the scores alone
        "small_similar", "top")


def test_advise_tool_names_the_best_of_several_backbones(run_tool, tmp_path):
    out = tmp_path / "advice"
    result = run_tool("advise.py", f"--backbone=seed_cnn,{TINY_BACKBONE}", "--weights=none",
                      "--image_size=32", "--dataset=digits", "--max_examples=100",
                      "--cuts=top", f"--workdir={out}")
    assert result.returncode == 0, result.stderr
    saved = json.loads((out / "advice.json").read_text())
    rows = saved["backbones"]
    assert list(rows) == ["seed_cnn", TINY_BACKBONE]
    logme = {name: row["measure"]["LogME"] for name, row in rows.items()}  # nothing pretrained
    assert saved["backbone"] == max(logme, key=logme.get)
    for name in rows:
        assert f"Backbone {list(rows).index(name) + 1}/2: {name}" in result.stdout
        assert f"{name} " in result.stdout.split("measured by")[-1]
    assert f"--backbone={saved['backbone']}" in result.stdout.split("Train it:")[-1]
    # The printed command trains what was measured (it dropped these before).
    command = result.stdout.split("Train it: ")[-1].split(" (or --regime=auto")[0]
    for flag in ("--weights=none", "--image_size=32", "--dataset=digits", "--max_examples=100",
                 f"--regime={saved['regime']}", f"--cut={saved['cut']}"):
        assert flag in command.split(), (flag, command)
    assert "--cuts" not in command and "--workdir" not in command
    bad = run_tool("advise.py", "--backbone=seed_cnn,nosuch", "--dataset=digits",
                   f"--workdir={tmp_path / 'x'}")
    assert bad.returncode == 2 and "nosuch" in bad.last_line() and "seed_cnn" in bad.last_line()


def test_finetune_auto_trains_the_best_of_several_backbones(run_tool, tmp_path):
    work = tmp_path / "run"
    result = run_tool("finetune.py", "--regime=auto", f"--backbone={TINY_BACKBONE},seed_cnn",
                      "--weights=none", "--image_size=32", "--dataset=digits",
                      "--max_examples=100", "--epochs=1", "--config.verbose=0",
                      f"--workdir={work}")
    assert result.returncode == 0, result.stderr
    config = json.loads((work / "config.json").read_text())
    advice = config["advice"]
    assert list(advice["backbones"]) == [TINY_BACKBONE, "seed_cnn"]
    assert config["backbone"] == advice["backbone"] == max(
        advice["backbones"], key=lambda n: advice["backbones"][n]["measure"]["LogME"])
    assert config["epochs"] == 1 and "<- best" in result.stdout


# --- Several labels per image (task=multi_label) --------------------------------------

def test_average_precision_is_scikit_learns_with_and_without_sample_weights():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    scores = np.round(rng.random((60, 4)), 1)  # rounded: tied scores, one threshold each
    truth = rng.random((60, 4)) < 0.3
    weights = rng.integers(0, 3, (5, 60))
    np.testing.assert_allclose(transferability.average_precisions(scores, truth), [
        average_precision_score(truth[:, c], scores[:, c]) for c in range(4)], atol=1e-12)
    np.testing.assert_allclose(transferability.average_precisions(scores, truth, weights), [
        [average_precision_score(truth[:, c], scores[:, c], sample_weight=w) for c in range(4)]
        for w in weights], atol=1e-12)
    assert tasks.MULTI_LABEL.score(scores, truth) == pytest.approx(
        average_precision_score(truth, scores, average="macro"), abs=1e-12)
    labels = rng.integers(0, 4, 60)  # single-label: the (weighted) share right
    right = scores.argmax(axis=1) == labels
    assert tasks.SINGLE_LABEL.score(scores, labels) == right.mean()
    np.testing.assert_allclose(tasks.SINGLE_LABEL.score(scores, labels, weights),
                               weights @ right / weights.sum(axis=1))


def _label_evidence(f, y):
    """One 0/1 target's log evidence per image, from the SVD (test_logme_is_...'s check)."""
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    x2 = (u.T @ y) ** 2
    return transferability._evidence(s ** 2, x2, float(y @ y - x2.sum()), *f.shape) / len(f)


def test_scores_of_label_vectors_average_each_label_and_rank_informative_features():
    from sklearn.metrics import average_precision_score
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(2)
    labels = (rng.random((240, 3)) < 0.4).astype("float32")
    informative = advise.standardise(np.concatenate(
        [labels + 0.4 * rng.normal(size=labels.shape), rng.normal(size=(240, 5))], axis=1))
    noise = advise.standardise(rng.normal(size=(240, 8)))
    # LogME: the mean of each label's evidence (present / absent), as of one-hot classes.
    assert transferability.logme(informative, labels) == pytest.approx(
        np.mean([_label_evidence(informative, labels[:, c]) for c in range(3)]), abs=1e-9)
    one_hot = np.eye(3)[np.arange(240) % 3]
    assert transferability.logme(informative, one_hot) == transferability.logme(
        informative, np.arange(240) % 3)
    # k-NN: each image scored by the share of its 5 nearest others holding a label; mAP.
    _, nearest = NearestNeighbors(n_neighbors=6).fit(informative).kneighbors(informative)
    shares = labels[nearest[:, 1:]].mean(axis=1)  # column 0: the image itself
    assert transferability.knn_score(informative, labels) == pytest.approx(
        average_precision_score(labels, shares, average="macro"), abs=1e-9)
    for score, margin in ((transferability.logme, 0.1), (transferability.h_score, 0.3),
                          (transferability.knn_score, 0.3)):
        assert score(informative, labels) > score(noise, labels) + margin


def test_the_pilots_bootstrap_the_mean_average_precision_of_label_vectors():
    rng = np.random.default_rng(3)
    truth = (rng.random((150, 3)) < 0.4).astype("float32")
    def pilot(probabilities):
        return pilots_lib.Pilot("frozen", "top", probabilities, truth, tasks.MULTI_LABEL, 0.0)
    guess = pilot(rng.random((150, 3)))
    ranked = pilot(np.clip(truth * 0.6 + 0.5 * rng.random((150, 3)), 0, 1))
    assert pilots_lib.lower_bound(guess, guess) == 0.0
    assert ranked.score > guess.score + 0.3
    assert pilots_lib.lower_bound(ranked, guess) > 0.2
    assert pilots_lib.lower_bound(guess, ranked) < 0


def _digit_labels(y):
    """Labels a digit holds or not, one to three at once: even, below 5, drawn round
    (0, 3, 5, 6, 8, 9), drawn straight (1, 4, 7)."""
    return np.stack([y % 2 == 0, y < 5, np.isin(y, (0, 3, 5, 6, 8, 9)), np.isin(y, (1, 4, 7))],
                    axis=1).astype("float32")


DIGIT_LABELS = ["even", "small", "round", "straight"]


@pytest.fixture(scope="module")
def multi_label_advice(tmp_path_factory):
    """The advisor, pilots included, on 200 digits with label vectors (seed_cnn pretrained)."""
    from tl_keras import arrays

    x, y, *_ = arrays.load_builtin("digits")
    config = tiny_config(tmp_path_factory.mktemp("multi"), backbone="seed_cnn", image_size=28,
                         weights=SEED_WEIGHTS, task="multi_label", pool_grid=1)
    config.workdir = ""
    plan = plan_lib.resolve(config)
    examples = data.from_arrays(x[:150], _digit_labels(y[:150]), DIGIT_LABELS, seed=0)
    datasets = data.make_datasets(examples, plan.config, plan.image_size)
    with traced():
        advice, sample = pilots_lib.advise(  # the fine-tuned pilot trains 1 epoch
            plan, datasets, verbose=0,
            pilots=pilots_lib.PilotSettings(scratch="never", passes=0.5))
    return plan, datasets, advice, sample


def test_the_advisor_scores_and_pilots_label_vectors_by_map(multi_label_advice):
    plan, datasets, advice, sample = multi_label_advice
    # The sample keeps each image's label vector (flattened, they would be class indices).
    read = np.concatenate([y for _, y in datasets.plain_train().as_numpy_iterator()])
    np.testing.assert_array_equal(sample.labels, read)
    assert sample.labels.shape == (datasets.train_examples, len(DIGIT_LABELS))
    assert advice.per_class == dict(zip(DIGIT_LABELS, sample.labels.sum(axis=0).astype(int)))
    for cut, row in advice.scores.items():
        f = advise.standardise(sample.features[f"pretrained/{cut}"])
        assert row["pretrained"] == round(np.mean(
            [_label_evidence(f, sample.labels[:, c]) for c in range(len(DIGIT_LABELS))]), 4)
        assert row["knn_pretrained"] == round(transferability.knn_map(f, sample.labels), 4)
    # The pilots: scored by the run's metric, on held-out images holding every label.
    assert advice.metric == "mAP" and advice.decided_by == "pilots"
    trained = [name for name in advice.pilots if name.startswith("finetuned@")]
    assert list(advice.pilots) == ["frozen@early", "frozen@middle", "frozen@late",
                                   "frozen@top", *trained] and len(trained) == 1
    assert all(set(row) == {"mAP", "seconds"} for row in advice.pilots.values())
    assert advice.measure()[0] == "pilot_mAP"
    _, held = pilots_lib.pilot_split(sample.labels, 0.3, plan.config.seed)
    assert (sample.labels[held].sum(axis=0) > 0).all()
    best = max(row["mAP"] for row in advice.pilots.values())
    assert best > 0.8  # chance: each label's share of the images, 0.4-0.5
    table = advise.format_table(advice)
    assert f"Pilots ({len(sample.labels) - len(held)} images, scored by mAP on {len(held)}" in table


@pytest.mark.slow  # ~20 s: 150 digits written as PNGs, the advisor with pilots, the run
def test_finetune_auto_advises_and_trains_a_multi_label_table(run_tool, tmp_path):
    import tensorflow as tf

    from tl_keras import arrays

    x, y, *_ = arrays.load_builtin("digits")
    rows = ["image,labels"]
    (tmp_path / "images").mkdir()
    for i, (image, vector) in enumerate(zip(x[:150], _digit_labels(y[:150]))):
        (tmp_path / "images" / f"{i}.png").write_bytes(tf.io.encode_png(image[..., None]).numpy())
        rows.append(f"images/{i}.png,{'|'.join(n for n, v in zip(DIGIT_LABELS, vector) if v)}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    work = tmp_path / "run"
    result = run_tool("finetune.py", "--regime=auto", "--config.task=multi_label",
                      "--backbone=seed_cnn", "--image_size=28", f"--weights={SEED_WEIGHTS}",
                      f"--dataset={tmp_path / 'labels.csv'}", "--epochs=2",
                      "--config.verbose=0", f"--workdir={work}")
    assert result.returncode == 0, result.stderr
    config = json.loads((work / "config.json").read_text())
    metrics = json.loads((work / "metrics.json").read_text())
    advice = config["advice"]
    assert (config["regime"], config["cut"], config["task"]) == (
        advice["regime"], advice["cut"], "multi_label")
    assert metrics["advice"] == advice and "val_mAP" in metrics
    assert advice["metric"] == "mAP" and advice["decided_by"] == "pilots"
    assert f"Advice: --regime={advice['regime']} --cut={advice['cut']}" in result.stdout
    if advice["regime"].startswith("small"):  # the advisor's features: the first view
        assert "(the first from the advisor)" in result.stdout
    report = (work / "report.html").read_text()
    assert "held-out mAP" in report and all(f"<td>{n}</td>" in report for n in advice["pilots"])
