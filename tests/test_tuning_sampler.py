"""The space file's ``sampler:`` section: TPE with the constant liar when trials run at once, multivariate + group,
every refusal, and the bench showing fewer near-duplicate proposals at concurrency 4 (Optuna ask/tell, no Ray)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from drugprot.tuning.space import SamplerSpec, SpaceError, load_space, parse_space

REPO = Path(__file__).resolve().parents[1]
PARAMS = {"params": {"loss.gamma": {"uniform": [0.0, 1.0]}}}


def test_defaults_are_liar_when_concurrent_multivariate_and_grouped():
    sampler = parse_space(PARAMS).sampler
    assert sampler == SamplerSpec(constant_liar="auto", multivariate=True, group=True)
    assert sampler.liar(1) is False and sampler.liar(2) is True and sampler.liar(4) is True
    tpe = sampler.tpe(seed=3, startup_trials=5, concurrent=4)
    assert (tpe._constant_liar, tpe._multivariate, tpe._group) == (True, True, True)
    assert sampler.tpe(seed=3, startup_trials=5, concurrent=1)._constant_liar is False


def test_explicit_settings_win_over_auto():
    sampler = parse_space({**PARAMS, "sampler": {"constant_liar": False, "multivariate": False, "group": False}}).sampler
    tpe = sampler.tpe(seed=0, startup_trials=5, concurrent=8)
    assert (tpe._constant_liar, tpe._multivariate, tpe._group) == (False, False, False)
    assert parse_space({**PARAMS, "sampler": {"constant_liar": True}}).sampler.liar(1) is True


@pytest.mark.parametrize("section, message", [
    ({"constant_liar": "yes"}, r"bad.yaml: sampler.constant_liar: expected auto, true or false, got 'yes'"),
    ({"multivariate": 1}, r"bad.yaml: sampler.multivariate: expected true or false, got 1"),
    ({"group": "true"}, r"bad.yaml: sampler.group: expected true or false, got 'true'"),
    ({"grop": True}, r"bad.yaml: sampler.grop: unknown key"),
    ({"multivariate": False}, r"bad.yaml: sampler: group: true needs multivariate: true"),
    ([1], r"bad.yaml: sampler: expected a mapping"),
])
def test_sampler_errors_name_the_file_and_key(section, message):
    with pytest.raises(SpaceError, match=message):
        parse_space({**PARAMS, "sampler": section}, "bad.yaml")


def test_sampler_section_round_trips_with_the_space(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("sampler: {constant_liar: true, group: false}\nparams:\n  loss.gamma: {uniform: [0, 1]}\n")
    space = load_space(path)
    assert space.sampler == SamplerSpec(constant_liar=True, multivariate=True, group=False)
    assert parse_space(space.raw, "again").sampler == space.sampler


def test_liar_and_multivariate_propose_fewer_near_duplicates_at_concurrency_4():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import tpe_concurrency as bench
    finally:
        sys.path.remove(str(REPO / "bench"))
    summary = bench.measure(load_space(REPO / "search_spaces" / "paper.yaml"), seeds=3, trials=32, concurrency=4,
                            eps=0.05)
    assert summary["baseline_near_duplicates"] >= 5, summary  # the problem exists without the liar
    assert summary["ours_near_duplicates"] * 4 <= summary["baseline_near_duplicates"], summary
