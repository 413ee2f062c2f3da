"""The study (experiments/study.py): its data, and the quick study end to end."""

import json
import os

import numpy as np
import pytest

from tl_keras import train
from experiments import study


def test_printed_characters_are_balanced_reproducible_and_varied():
    if not os.path.isdir(study.FONT_DIR):
        pytest.skip(f"no {study.FONT_DIR}: apt-get install fonts-dejavu-core (CI installs it)")
    x, y = study.printed_characters(200, seed=3)
    again, _ = study.printed_characters(200, seed=3)
    np.testing.assert_array_equal(x, again)
    assert x.shape == (200, study.IMAGE_SIZE, study.IMAGE_SIZE) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [20] * len(study.CHARACTERS)
    # Two images of one character differ (font, size, rotation, shift, noise) ...
    first, second = x[y == 0][:2].astype(float)
    assert np.abs(first - second).mean() > 10
    # ... and the characters differ on average more than noise.
    means = np.stack([x[y == c].mean(axis=0) for c in range(len(study.CHARACTERS))])
    assert np.abs(means[0] - means[5]).mean() > 5


@pytest.mark.slow
def test_quick_study_table_and_the_effects_that_hold_across_seeds(tmp_path, monkeypatch):
    out, work = tmp_path / "out", tmp_path / "work"
    results = study.run(study.QUICK, out_dir=str(out), work_dir=str(work), lite=False)
    summary = results["summary"]
    assert list(summary) == ["similar/small", "similar/large", "different/small",
                             "different/large"]
    for key, quadrant in summary.items():
        assert list(quadrant["strategies"]) == ["R1", "R2", "R3", "R4"]
        assert all(s["n"] == 1 and 0 <= s["mean"] <= 1 for s in quadrant["strategies"].values())
    assert summary["different/large"]["prescribed"] == ["R3", "R4"]
    table = (out / "table.md").read_text().splitlines()
    assert len(table) == 2 + 4 and table[0].startswith("| target / size | R1 frozen@fc2 |")
    for name in ("study.json", "heatmap.png", "depth_similar.png", "depth_different.png",
                 "seed_cnn_fashion0-4.weights.h5"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "study.json").read_text())["summary"] == json.loads(
        json.dumps(summary))

    def r(key, strategy):
        return summary[key]["strategies"][strategy]["mean"]

    # Pretrained top features transfer: a frozen head on them is far above chance (0.2).
    assert r("similar/small", "R1") > 0.6
    for size in ("small", "large"):
        # Top-layer features are specific to the source: frozen at fc2 they serve the
        # similar target far better than the different one (Yosinski's main finding).
        assert r(f"similar/{size}", "R1") > r(f"different/{size}", "R1") + 0.1
        # On the different target, the early layers transfer better than the top.
        assert r(f"different/{size}", "R2") > r(f"different/{size}", "R1") + 0.05

    # A killed study resumes: only the cell without metrics.json trains again.
    os.remove(work / "different-large-scratch-seed0" / "metrics.json")
    calls = []
    finetune = train.finetune
    monkeypatch.setattr(train, "finetune", lambda *a, **k: calls.append(a[0]) or finetune(*a, **k))
    again = study.run(study.QUICK, out_dir=str(out), work_dir=str(work), lite=False)
    assert [c.workdir for c in calls] == [str(work / "different-large-scratch-seed0")]
    assert again["summary"]["similar/small"] == summary["similar/small"]
