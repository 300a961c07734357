# Fine-tune, merge, export and serve LLaMA with PaddleNLP, as the llama2-13b-on-NPU guide does by
# hand, as one DAG. `snakemake --cores 2 results/predictions.json` runs the embedded CPU default.
from snakemake.utils import min_version

# The Snakemake internals llamapipe.snakemake_hooks.workflow_glue uses are all in 9.0.0 (read in
# the 9.0.0, 9.1, 9.5, 9.10, 9.14, 9.20, 9.24 and 9.27.1 sources; this workflow dry-runs on 9.0.0).
# A Snakemake that lacks one stops at parse time naming it. Tested: the pin in envs/constraints.txt.
min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/setup.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/serve.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/variants.smk"


rule all:
    default_target: True
    input:
        default_targets(),
