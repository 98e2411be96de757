"""`mpitrain synth --multi-label`: a table of independent findings, each its own pattern,
reused when asked again with the same parameters, refused with others."""

from __future__ import annotations

import csv

import cv2
import numpy as np
import pytest

from mpitrain.cli import main
from mpitrain.data.synth import FINDINGS, generate_multilabel
from mpitrain.errors import UserError


def test_the_table_lists_every_image_with_independent_findings(tmp_path):
    out = generate_multilabel(tmp_path / "ml", images=200, image_size=24, seed=3, prevalence=0.4)
    with open(out / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 200 and list(rows[0]) == ["path", "patient", *FINDINGS]
    y = np.array([[int(r[c]) for c in FINDINGS] for r in rows])
    assert np.allclose(y.mean(0), 0.4, atol=0.1)  # the prevalence, per finding
    assert abs(np.corrcoef(y.T)[0, 1]) < 0.2  # drawn independently
    assert len({r["patient"] for r in rows}) == 100  # two images per patient
    healthy = [cv2.imread(str(out / r["path"]), cv2.IMREAD_GRAYSCALE) for r, v in zip(rows, y) if not v.any()]
    sick = [cv2.imread(str(out / r["path"]), cv2.IMREAD_GRAYSCALE) for r, v in zip(rows, y) if v.all()]
    assert healthy[0].shape == (24, 24) and np.mean(sick) > np.mean(healthy)  # filled-in lungs are brighter
    again = generate_multilabel(tmp_path / "ml", images=200, image_size=24, seed=3, prevalence=0.4)
    assert again == out  # reused as it is
    with pytest.raises(UserError, match="other parameters"):
        generate_multilabel(tmp_path / "ml", images=200, image_size=24, seed=4, prevalence=0.4)


def test_the_command_line_and_its_one_line_errors(tmp_path, capsys):
    assert main(["synth", "--multi-label", "--images", "4", "--image-size", "16", "--out", str(tmp_path / "s")]) == 0
    assert "--multi-label --patient-column patient" in capsys.readouterr().out
    assert main(["synth", "--multi-label", "--prevalence", "1.5", "--out", str(tmp_path / "t")]) == 2
    assert "--prevalence must be between 0 and 1" in capsys.readouterr().err
