"""The members' disagreement: votes from one pass, the uncertain volume, the suggested click."""

from __future__ import annotations

import numpy as np
import pytest

from service.engine.uncertainty import (
    decode_summary,
    decode_votes,
    encode_uncertainty,
    suggested_click,
    summarise,
    votes_after_clicks,
)
from service.store.contract import Click

MEMBERS = 5


def _votes_with_two_split_regions() -> tuple[np.ndarray, np.ndarray]:
    votes = np.zeros((20, 20, 20), np.uint8)
    votes[2:12, 2:12, 2:12] = 2  # large region, minority foreground: the mask says background
    votes[15:18, 15:18, 15:18] = 4  # small region, majority foreground
    probability = votes.astype(np.float32) / MEMBERS
    return votes, probability


def test_suggestion_lands_deep_in_the_largest_split_region_with_the_minority_label() -> None:
    votes, probability = _votes_with_two_split_regions()
    click = suggested_click(votes, MEMBERS, probability)
    assert click is not None
    assert all(5 <= v <= 8 for v in click.voxel)  # the 10^3 cube's centre, not the small cube
    assert click.label == "foreground"  # the mean probability 0.4 leaves it out of the mask
    probability[2:12, 2:12, 2:12] = 0.6  # same split, but now the mask includes it
    assert suggested_click(votes, MEMBERS, probability).label == "background"


def test_unanimous_members_suggest_nothing_and_have_no_uncertain_volume() -> None:
    votes = np.zeros((8, 8, 8), np.uint8)
    votes[2:5, 2:5, 2:5] = MEMBERS
    summary = summarise(votes, MEMBERS, votes / MEMBERS, spacing_mm=2.0)
    assert summary.suggested_click is None
    assert summary.uncertain_voxels == 0 and summary.uncertain_ml == 0.0


def test_uncertain_volume_counts_split_voxels_in_ml() -> None:
    votes, probability = _votes_with_two_split_regions()
    summary = summarise(votes, MEMBERS, probability, spacing_mm=2.0)
    assert summary.uncertain_voxels == 1000 + 27
    assert summary.uncertain_ml == pytest.approx(1027 * 8 / 1000)


def test_clicked_balls_count_as_agreed() -> None:
    votes, _ = _votes_with_two_split_regions()
    agreed = votes_after_clicks(votes, MEMBERS, [Click("foreground", (7, 7, 7))], radius_voxels=2.0)
    assert agreed[7, 7, 7] == MEMBERS and agreed[7, 7, 9] == MEMBERS
    assert agreed[2, 2, 2] == 2  # elsewhere unchanged


def test_blob_round_trip_keeps_votes_and_summary() -> None:
    votes, probability = _votes_with_two_split_regions()
    summary = summarise(votes, MEMBERS, probability, spacing_mm=1.0)
    blob = encode_uncertainty(votes, summary)
    assert decode_summary(blob) == summary
    np.testing.assert_array_equal(decode_votes(blob), votes)


def test_ensemble_votes_agree_with_its_members(tiny_weights) -> None:
    """The votes of one pass are the count of members whose own sigmoid exceeds 0.5."""
    import torch

    from service.engine.checkpoints import load_checkpoint
    from service.engine.ensemble import Ensemble

    checkpoint = load_checkpoint(tiny_weights)
    ensemble = Ensemble(checkpoint.stages["initial"], torch.device("cpu"))
    inputs = np.random.default_rng(0).normal(size=(2, 32, 32, 32)).astype(np.float32)
    result = ensemble.run(inputs)
    with torch.no_grad():
        sigmoids = [torch.sigmoid(m(torch.from_numpy(inputs)[None]))[0, 0].numpy() for m in ensemble.members]
    np.testing.assert_array_equal(result.votes, sum((s > 0.5).astype(np.uint8) for s in sigmoids))
    np.testing.assert_allclose(result.probability, np.mean(sigmoids, axis=0), atol=1e-6)
    assert result.members == 5
