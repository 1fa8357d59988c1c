"""The end-to-end quality gate: a confidence bound on the held-out mean PSNR, by hand."""

import math

import pytest
import torch

from ditopt.profiles import Budget
from ditopt.verify import psnr_lower_bound, verify_end_to_end


def test_psnr_lower_bound_by_hand():
    values = [30.0, 32.0, 34.0, 36.0]  # mean 33, sample sd sqrt(20/3)
    sd = math.sqrt(20.0 / 3.0)
    assert psnr_lower_bound(values, 0.9) == pytest.approx(33.0 - 1.6377 * sd / 2.0, abs=1e-3)
    assert psnr_lower_bound(values, 0.5) == pytest.approx(33.0)
    assert psnr_lower_bound([31.5], 0.9) == 31.5  # one sample: no spread to estimate
    assert psnr_lower_bound([math.inf, math.inf], 0.9) == math.inf
    # An identical sample counts as 100 dB in the spread instead of making it infinite.
    assert psnr_lower_bound([math.inf, 40.0], 0.5) == pytest.approx(70.0)
    # Tabulated t quantiles: 1.6377 (0.9, 3 dof) above; 2.3534 (0.95, 3 dof).
    assert psnr_lower_bound(values, 0.95) == pytest.approx(33.0 - 2.3534 * sd / 2.0, abs=1e-3)


class _Probe(torch.nn.Module):
    """Stands in for the optimized model: the sampling functions below call it once."""

    def forward(self) -> None:
        return None


def _offset_sampler(offsets):
    """A 'sampling function' whose sample i differs from zeros by offsets[i] (PSNR -20 log10 o)."""
    ref = torch.zeros(len(offsets), 1, 8, 8, dtype=torch.float64)

    def sample(model):
        model()
        return ref + torch.tensor(offsets, dtype=torch.float64).view(-1, 1, 1, 1)

    return ref, sample


def test_gate_fails_a_mean_that_passes_on_too_few_spread_samples():
    ref, sample = _offset_sampler([0.1, 0.001])  # 20 dB and 60 dB: mean 40
    strict = verify_end_to_end(sample, ref, _Probe(), min_psnr_db=35.0, confidence=0.9)
    assert strict.psnr_db == pytest.approx(40.0)
    assert strict.psnr_lower_db == pytest.approx(40.0 - 3.0777 * math.sqrt(800.0) / math.sqrt(2.0), abs=1e-2)
    assert not strict.passed
    spread = strict.details[0]
    assert spread["samples"] == 2 and spread["psnr_min_db"] == pytest.approx(20.0) and spread["psnr_max_db"] == pytest.approx(60.0)
    # The bare mean (confidence 0.5) passes the same samples.
    assert verify_end_to_end(sample, ref, _Probe(), min_psnr_db=35.0, confidence=0.5).passed


def test_gate_passes_consistent_samples_above_budget():
    ref, sample = _offset_sampler([0.01, 0.0105, 0.0095, 0.01])  # all ~40 dB
    result = verify_end_to_end(sample, ref, _Probe(), min_psnr_db=39.0, confidence=0.9)
    assert result.passed and 39.0 < result.psnr_lower_db < result.psnr_db


def test_budget_confidence_is_validated():
    assert Budget(min_psnr_db=30).psnr_confidence == 0.9
    with pytest.raises(ValueError, match="psnr_confidence"):
        Budget(min_psnr_db=30, psnr_confidence=1.0)
    assert Budget(min_psnr_db=30).retry_margin_db == 1.0
    with pytest.raises(ValueError, match="retry_margin_db"):
        Budget(min_psnr_db=30, retry_margin_db=-0.5)


def test_a_validation_function_that_ignores_its_model_is_caught():
    """It would compare the original with itself and pass at inf dB."""
    from ditopt.errors import CalibrationError

    ref = torch.zeros(4, 1, 8, 8)
    with pytest.raises(CalibrationError, match="never called the model"):
        verify_end_to_end(lambda model: ref.clone(), ref, _Probe(), min_psnr_db=30.0, confidence=0.9)


def test_only_the_held_out_rows_are_judged():
    """Rows the search saw (0, 2) are perfect; the held-out rows (1, 3) decide, at 20 dB."""
    ref, sample = _offset_sampler([0.0, 0.1, 0.0, 0.1])
    result = verify_end_to_end(sample, ref, _Probe(), min_psnr_db=30.0, confidence=0.9, rows=[1, 3])
    assert result.psnr_db == pytest.approx(20.0) and not result.passed
    assert result.details[0]["samples"] == 2 and result.details[0]["rows"] == [1, 3]
