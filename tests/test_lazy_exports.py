"""The analysis entry points are importable from the package without loading the analysis stack first."""

import subprocess
import sys

import pytest

import usmoe_lp


def test_lazy_names_resolve_to_their_modules():
    from usmoe_lp.diagnostics import analyze
    from usmoe_lp.model_analysis import analyze_model

    assert usmoe_lp.analyze is analyze and usmoe_lp.analyze_model is analyze_model
    assert {"analyze", "analyze_model"} <= set(usmoe_lp.__all__)
    with pytest.raises(AttributeError, match="has no attribute 'analyse'"):
        usmoe_lp.analyse  # noqa: B018


def test_import_does_not_load_the_analysis_stack():
    code = "import sys, usmoe_lp; print('usmoe_lp.diagnostics.analyze' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
