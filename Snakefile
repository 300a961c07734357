# Fine-tune, merge, export and serve LLaMA with PaddleNLP, as the llama2-13b-on-NPU guide does by
# hand, as one DAG. `snakemake --cores 2 results/predictions.json` runs the embedded CPU default.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/setup.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/serve.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        default_targets(),
