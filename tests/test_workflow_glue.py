from __future__ import annotations

import dataclasses

import pytest

from llamapipe.snakemake_hooks.workflow_glue import chain_gaps, variant_chain_gaps

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


def test_a_variants_gap_counts_only_when_the_request_needs_that_variant():
    v = "results/variants"
    chains = {name: ["r/pre", f"{v}/{name}/sft", f"{v}/{name}/merged", f"{v}/{name}/metrics.json"]
              for name in ("full", "lora")}
    present = _exists({"r/pre", f"{v}/full/sft", f"{v}/full/metrics.json", f"{v}/lora/sft", f"{v}/lora/metrics.json"})
    # the comparison (anything under the variants' directory but no variant's own) needs every variant
    assert variant_chain_gaps(chains, [f"{v}/comparison.html"], v, present) == [f"{v}/full/merged",
                                                                                f"{v}/lora/merged"]
    assert variant_chain_gaps(chains, [f"{v}/lora/metrics.json"], v, present) == [f"{v}/lora/merged"]
    assert variant_chain_gaps(chains, ["results/predictions.json"], v, present) == []
    # asking for one variant's sft does not rebuild its merged
    assert variant_chain_gaps(chains, [f"{v}/lora/sft"], v, present) == []


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



# The glue uses Snakemake internals (issue 20): checked when it is installed, and here against the
# installed Snakemake, so a Snakemake that moves one fails these tests, not a user's run.

def _execute(self, executor_plugin, executor_settings, updated_files=None):
    return "executed"


def _fake_workflow(drop=(), **overrides):
    """A stand-in with everything the glue uses of a Workflow, less ``drop``."""
    attrs = {"execute": _execute, "dag_settings": None, "execution_settings": None, "is_main_process": True,
             "rules": (), **overrides}
    return type("FakeWorkflow", (), {k: v for k, v in attrs.items() if k not in drop})()


def test_tested_snakemake_is_the_pin():
    from conftest import ROOT
    from llamapipe.snakemake_hooks.workflow_glue import TESTED_SNAKEMAKE

    pins = [line.split("==", 1)[1].strip() for line in (ROOT / "envs/constraints.txt").read_text().splitlines()
            if line.split("==", 1)[0].strip().lower() == "snakemake"]
    assert pins == [TESTED_SNAKEMAKE]


def test_installed_snakemake_has_everything_the_glue_uses():
    import snakemake
    import snakemake.api  # noqa: F401  (first: snakemake.workflow imported on its own is a circular import)
    from snakemake.workflow import Workflow

    from llamapipe.snakemake_hooks.workflow_glue import (
        SNAKEMAKE_CLASS_API,
        SNAKEMAKE_WORKFLOW_API,
        _snakemake_classes,
        missing_snakemake_api,
    )

    # on the class, as at parse time: the settings are dataclass fields, the rest properties and methods
    fields = {f.name for f in dataclasses.fields(Workflow)}
    for name in SNAKEMAKE_WORKFLOW_API:
        assert name in fields or hasattr(Workflow, name), f"snakemake {snakemake.__version__}: Workflow.{name}"
    classes = _snakemake_classes()
    assert len(classes) == len(SNAKEMAKE_CLASS_API)
    assert [label for label, cls, _, _ in classes if cls is None] == []
    # the real settings classes, with the stand-in for the Workflow
    assert missing_snakemake_api(_fake_workflow()) == []


def test_glue_works_through_a_real_snakemake_run(tmp_path):
    """A real Workflow: the check passes on it, and both hooks act on its settings in a dry-run."""
    from conftest import planned_jobs, snakemake

    (tmp_path / "Snakefile").write_text(
        "from llamapipe.snakemake_hooks.workflow_glue import install_execution_hooks, missing_snakemake_api\n"
        "print('missing:', missing_snakemake_api(workflow), flush=True)\n"
        "rule make_b:\n    input: 'a.txt'\n    output: 'b.txt'\n    shell: 'cp {input} {output}'\n"
        "rule make_a:\n    output: 'a.txt'\n    shell: 'touch {output}'\n"
        "install_execution_hooks(workflow, ['a.txt', 'b.txt'], default_target='b.txt')\n"
    )
    (tmp_path / "b.txt").write_text("")
    out = snakemake(tmp_path, "-n", "--cores", "1").stdout
    assert "missing: []" in out
    assert "a.txt is missing while later outputs exist" in out
    assert planned_jobs(tmp_path, "--cores", "1") == {"make_a", "make_b"}

    (tmp_path / "a.txt").write_text("")
    out = snakemake(tmp_path, "-n", "--cores", "1", "--forcerun", "make_b", "b.txt").stdout
    assert "reading --forcerun b.txt make_b as --forcerun make_b with target(s) b.txt" in out
    assert planned_jobs(tmp_path, "--cores", "1", "--forcerun", "make_b", "b.txt") == {"make_b"}


@pytest.mark.parametrize("dropped", ["execute", "dag_settings", "execution_settings", "is_main_process", "rules"])
def test_a_workflow_without_an_attribute_gets_a_clear_error(dropped):
    import snakemake
    from snakemake.exceptions import WorkflowError

    from llamapipe.snakemake_hooks.workflow_glue import TESTED_SNAKEMAKE, install_execution_hooks

    with pytest.raises(WorkflowError) as raised:  # not an AttributeError
        install_execution_hooks(_fake_workflow(drop=[dropped]), CHAIN, "d")
    message = str(raised.value)
    assert f"Workflow.{dropped}" in message
    assert f"Snakemake {snakemake.__version__}" in message
    assert f"snakemake=={TESTED_SNAKEMAKE}" in message


def test_execute_called_another_way_gets_a_clear_error():
    from snakemake.exceptions import WorkflowError

    from llamapipe.snakemake_hooks.workflow_glue import install_execution_hooks

    def execute(self, plugin, settings):
        return "executed"

    with pytest.raises(WorkflowError, match=r"Workflow\.execute\(executor_plugin"):
        install_execution_hooks(_fake_workflow(execute=execute), CHAIN, "d")


def test_settings_classes_that_moved_are_named():
    from snakemake.exceptions import WorkflowError

    from llamapipe.snakemake_hooks.workflow_glue import check_snakemake_api, missing_snakemake_api

    @dataclasses.dataclass(frozen=True)
    class DAGSettings:
        targets: frozenset = frozenset()

    classes = [("DAGSettings", DAGSettings, ("forcerun", "targets"), True),
               ("snakemake.settings.types.ExecutionSettings", None, ("lock",), False)]
    assert missing_snakemake_api(_fake_workflow(), classes) == [
        "DAGSettings.forcerun", "DAGSettings (frozen: forcerun, targets cannot be reassigned)",
        "snakemake.settings.types.ExecutionSettings"]
    with pytest.raises(WorkflowError, match="DAGSettings.forcerun"):
        check_snakemake_api(_fake_workflow(), classes)


def test_installed_hook_wraps_execute_and_passes_the_check_again():
    from llamapipe.snakemake_hooks.workflow_glue import install_execution_hooks, missing_snakemake_api

    workflow = _fake_workflow(is_main_process=False)
    install_execution_hooks(workflow, CHAIN, "d")
    assert workflow.execute.__wrapped__ is not None
    assert missing_snakemake_api(workflow) == []
    assert workflow.execute(executor_plugin=None, executor_settings=None) == "executed"
