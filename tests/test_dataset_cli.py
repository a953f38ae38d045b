"""cvig dataset --per-class: exactly N images of every class, or a refusal that says how many there are."""
from __future__ import annotations

import numpy as np
from click.testing import CliRunner

from clustervig.cli import cvig
from clustervig.data import digits_split


def test_per_class_above_what_a_class_holds_is_refused(tmp_path):
    res = CliRunner().invoke(cvig, ["dataset", "photo-patches", "--split", "test", "--per-class", "100",
                                    "-o", str(tmp_path / "p")])
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines()[-1] == (
        "Error: Invalid value for --per-class: 100 is more than the test split of photo-patches holds (16 images per "
        "class, 256 in all); give 16 or less, or 0 for every image of every class")
    assert not (tmp_path / "p").exists() and list(tmp_path.iterdir()) == []
    # digits: uneven classes (35 to 37 held-out scans each): 36 would give some classes fewer
    counts = np.bincount(digits_split()[1].labels.numpy())
    assert (counts.min(), counts.max(), counts.sum()) == (35, 37, 360)
    res = CliRunner().invoke(cvig, ["dataset", "digits", "--split", "test", "--per-class", "36", "-o", str(tmp_path / "d")])
    assert res.exit_code == 2 and "35 to 37 images per class, 360 in all); give 35 or less" in res.output, res.output
    assert not (tmp_path / "d").exists()


def test_per_class_at_the_smallest_class_writes_that_many_of_each(tmp_path):
    res = CliRunner().invoke(cvig, ["dataset", "digits", "--split", "test", "--per-class", "35", "-o", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    per_folder = {d.name: len(list(d.glob("*.png"))) for d in (tmp_path / "d").iterdir()}
    assert per_folder == {str(c): 35 for c in range(10)}
    assert f"wrote 350 images of the test split of digits to {tmp_path / 'd'}/" in res.output
