"""mpitrain export's rules that need no model: the 16-bit input rule and what --overwrite may replace."""

import numpy as np
import pytest

from mpitrain.errors import UserError
from mpitrain.evaluate.export import check_out, to_pixels


def test_16_bit_pixels_become_the_nearest_8_bit_value():
    v = np.arange(65536, dtype=np.uint16)
    assert np.array_equal(to_pixels(v, 65535.0), np.rint(v / 257.0).astype(np.uint8))
    eight = np.arange(256, dtype=np.uint8)  # 8-bit rows stored as 16-bit (x 257) come back exactly
    assert np.array_equal(to_pixels(eight.astype(np.uint16) * np.uint16(257), 65535.0), eight)
    assert np.array_equal(to_pixels(eight, 255.0), eight)


def test_overwrite_replaces_only_an_earlier_export(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.keras").write_text("a model")
    with pytest.raises(UserError, match="holds no export.json"):
        check_out(run, overwrite=True)  # --out RUN --overwrite must not delete a run
    with pytest.raises(UserError, match="--overwrite"):
        check_out(run, overwrite=False)
    (run / "export.json").write_text("{}")
    check_out(run, overwrite=True)
    check_out(tmp_path / "new", overwrite=False)
    (tmp_path / "empty").mkdir()
    check_out(tmp_path / "empty", overwrite=False)
