"""The token-dependent timestep shift (issue 11): MirrorMe's shift 17 (§4.1) is anchored at the paper clip's 6144
tokens and scales with sqrt(tokens) (SD3 §5.3.2), so a 192-token CPU clip trains at about 3."""

from __future__ import annotations

import math

import pytest
import torch

from halfbody.models.flow_matching import RectifiedFlow, shift_timesteps, token_shift
from config_utils import compose_train


def test_rule_keeps_the_paper_value_at_the_paper_size():
    assert token_shift(17.0, 6144, 6144) == pytest.approx(17.0)
    assert token_shift(17.0, 192, 6144) == pytest.approx(17.0 * math.sqrt(192 / 6144))  # ~3.0
    # shifts compose by multiplication: shifting by the paper value, then by sqrt(m / n), is the rule's shift
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    alpha = math.sqrt(192 / 6144)
    assert torch.allclose(shift_timesteps(shift_timesteps(t, 17.0), alpha), shift_timesteps(t, token_shift(17, 192, 6144)))


def test_training_timesteps_follow_the_token_count():
    flow = RectifiedFlow(shift=17.0, sample_shift=3.0, shift_tokens=6144)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    small = flow.sample_timesteps(20000, generator=g(), num_tokens=192)
    paper = flow.sample_timesteps(20000, generator=g(), num_tokens=6144)
    # shift s puts the median of t at s / (1 + s): ~0.75 at 192 tokens, ~0.94 at the paper's 6144
    assert float(small.median()) == pytest.approx(3.005 / 4.005, abs=0.01)
    assert float(paper.median()) == pytest.approx(17 / 18, abs=0.01)
    assert float((small < 0.2).float().mean()) > 0.05  # low noise is seen (at shift 17: ~1.4 %)
    # without an anchor (or without a token count) the configured shift applies at every size
    assert torch.equal(RectifiedFlow(17.0).sample_timesteps(100, generator=g(), num_tokens=192),
                       flow.sample_timesteps(100, generator=g()))
    with pytest.raises(ValueError, match="shift_tokens=0"):
        RectifiedFlow(17.0, shift_tokens=0)


def test_presets_share_the_paper_anchor():
    for model in ("mirrorme_tiny", "mirrorme"):
        flow = compose_train([f"model={model}"]).model.flow
        assert (flow.shift, flow.shift_tokens) == (17.0, 6144)
