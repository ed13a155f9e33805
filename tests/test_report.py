"""write_report(): a PNG with real image content, an HTML page embedding it with the plans."""

from __future__ import annotations

import base64
import re
import sys

import numpy as np
import pytest

from bayesDREAM_ext.readers import MissingDependencyError
from bayesDREAM_ext.report import write_report
from tests.fit_fixtures import fake_negbinom, small_fit

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _pixels(data: bytes) -> np.ndarray:
    import io

    from matplotlib.image import imread

    return imread(io.BytesIO(data), format="png")


def _assert_drawn(data: bytes) -> None:
    """A PNG of the report's size whose pixels are not all one colour, with coloured lines."""
    assert data.startswith(PNG_SIGNATURE)
    pixels = _pixels(data)
    assert pixels.shape[0] >= 900 and pixels.shape[1] >= 1600
    rgb = pixels[..., :3]
    assert rgb.std() > 0.05
    coloured = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.3  # the loss, rate and effect lines are not grey
    assert coloured.mean() > 0.005


def test_png_report_of_a_real_fit(tmp_path):
    path = write_report(small_fit(), tmp_path / "report.png")
    _assert_drawn(path.read_bytes())


def test_html_report_embeds_the_figure_and_states_plans_and_convergence(tmp_path):
    fit = small_fit()
    text = write_report(fit, tmp_path / "report.html").read_text()
    image = re.search(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", text)
    assert image is not None
    _assert_drawn(base64.b64decode(image.group(1)))
    assert "<h2>Convergence</h2>" in text and f"after {len(fit.losses)} steps" in text
    for reason in fit.svi_plan.reasons + fit.predictive_plan.reasons:
        assert reason.replace("&", "&amp;") in text
    assert "gene" in text and "effect_q95" in text


def test_report_of_a_fake_record_and_a_bad_suffix(tmp_path):
    _assert_drawn(write_report(fake_negbinom(), tmp_path / "fake.png").read_bytes())
    with pytest.raises(ValueError, match=r"\.html or \.png"):
        write_report(fake_negbinom(), tmp_path / "report.pdf")


def test_without_matplotlib_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(MissingDependencyError, match=r'pip install -e "\.\[report\]"'):
        write_report(fake_negbinom(), tmp_path / "r.png")
