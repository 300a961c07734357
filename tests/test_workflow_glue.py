from __future__ import annotations

from llamapipe.snakemake_hooks.workflow_glue import chain_gaps

CHAIN = ["a", "b", "c", "d", "e"]


def _exists(present):
    return lambda p: p in present


def test_no_gap_when_everything_or_nothing_exists():
    assert chain_gaps(CHAIN, ["e"], "d", _exists(set(CHAIN))) == []
    assert chain_gaps(CHAIN, ["e"], "d", _exists(set())) == []


def test_first_missing_before_an_existing_later_output():
    assert chain_gaps(CHAIN, ["e"], "d", _exists({"a", "b", "d", "e"})) == ["c"]
    assert chain_gaps(CHAIN, ["e"], "d", _exists({"a", "d"})) == ["b"]


def test_only_outputs_the_request_depends_on_count():
    # asking for "b" must not rebuild "c" just because "e" exists
    assert chain_gaps(CHAIN, ["b"], "d", _exists({"a", "b", "d", "e"})) == []
    # no known target requested: the default target decides
    assert chain_gaps(CHAIN, ["other"], "d", _exists({"a", "b", "d", "e"})) == ["c"]
    assert chain_gaps(CHAIN, ["d/"], "d", _exists({"a", "d"})) == ["b"]


def test_paths_swallowed_by_forcerun_become_the_targets():
    from llamapipe.snakemake_hooks.workflow_glue import split_swallowed_targets

    rules = ["export", "predict", "sft"]
    assert split_swallowed_targets(["export", "results/predictions.json"], [], rules) == (
        ["export"], ["results/predictions.json"])
    # explicit targets, or only rules, or only paths: left exactly as given
    assert split_swallowed_targets(["export"], ["results/predictions.json"], rules) == (
        ["export"], ["results/predictions.json"])
    assert split_swallowed_targets(["export", "sft"], [], rules) == (["export", "sft"], [])
    assert split_swallowed_targets(["results/sft"], [], rules) == (["results/sft"], [])
