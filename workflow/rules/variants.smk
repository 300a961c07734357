# Variants (config `variants:`): the plain run's rules again, one job each per variant, with the
# variant's config and paths (results/variants/<name>/). Stages a variant shares with the plain
# run (llamapipe.config.variants) are the plain run's jobs: its inputs name their outputs.


use rule download_data as download_data_variant with:
    input:
        PATHS["preflight"],
        image_inputs(),
    output:
        train=f"{VARIANT}/raw_data/train.json",
        dev=f"{VARIANT}/raw_data/dev.json",
    log:
        f"{VARIANT}/logs/download_data.log",
    benchmark:
        f"{VARIANT}/benchmarks/download_data.tsv"
    params:
        cmd=variant_cmd("download_data"),


use rule prepare_data as prepare_data_variant with:
    input:
        variant_path("raw_data", "train.json"),
        variant_path("raw_data", "dev.json"),
        image_inputs(),
    output:
        train=f"{VARIANT}/data/train.json",
        dev=f"{VARIANT}/data/dev.json",
        report=f"{VARIANT}/data/report.json",
    log:
        f"{VARIANT}/logs/prepare_data.log",
    benchmark:
        f"{VARIANT}/benchmarks/prepare_data.tsv"
    params:
        cmd=variant_cmd("prepare_data"),


use rule init_model as init_model_variant with:
    input:
        variant_path("train"),
        image_inputs(),
    output:
        directory(f"{VARIANT}/model/base"),
    log:
        f"{VARIANT}/logs/init_model.log",
    benchmark:
        f"{VARIANT}/benchmarks/init_model.tsv"
    params:
        cmd=variant_cmd("init_model", config_threads),


use rule sft as sft_variant with:
    input:
        variant_path("train"),
        variant_path("base_model"),
        image_inputs(),
        plan_inputs(),
        upstream_inputs(),
        smoke_inputs(),
    output:
        directory(f"{VARIANT}/sft"),
    log:
        f"{VARIANT}/logs/sft.log",
    benchmark:
        f"{VARIANT}/benchmarks/sft.tsv"
    params:
        cmd=variant_cmd("sft", config_threads),


use rule merge as merge_variant with:
    input:
        f"{VARIANT}/sft",
        variant_path("base_model"),
        image_inputs(),
        upstream_inputs(),
    output:
        directory(f"{VARIANT}/merged"),
    log:
        f"{VARIANT}/logs/merge.log",
    benchmark:
        f"{VARIANT}/benchmarks/merge.tsv"
    params:
        cmd=variant_cmd("merge"),


use rule export as export_variant with:
    input:
        f"{VARIANT}/merged",
        image_inputs(wheels=True),
        upstream_inputs(),
    output:
        directory(f"{VARIANT}/inference"),
    log:
        f"{VARIANT}/logs/export.log",
    benchmark:
        f"{VARIANT}/benchmarks/export.tsv"
    params:
        cmd=variant_cmd("export"),


use rule predict as predict_variant with:
    input:
        f"{VARIANT}/inference",
        variant_path("dev"),
        image_inputs(wheels=True),
        upstream_inputs(),
    output:
        f"{VARIANT}/predictions.json",
    log:
        f"{VARIANT}/logs/predict.log",
    benchmark:
        f"{VARIANT}/benchmarks/predict.tsv"
    threads: variant_threads(predict_threads)
    params:
        cmd=variant_cmd("predict", predict_threads),


use rule evaluate as evaluate_variant with:
    input:
        f"{VARIANT}/predictions.json",
        image_inputs(),
    output:
        f"{VARIANT}/metrics.json",
    log:
        f"{VARIANT}/logs/evaluate.log",
    benchmark:
        f"{VARIANT}/benchmarks/evaluate.tsv"
    params:
        cmd=variant_cmd("evaluate"),


use rule plots as plots_variant with:
    input:
        sft=f"{VARIANT}/sft",
        benchmarks=variant_benchmarks,
    output:
        loss=f"{VARIANT}/plots/loss.png",
        times=f"{VARIANT}/plots/stage_times.png",
    log:
        f"{VARIANT}/logs/plots.log",
    params:
        cmd=variant_cmd("plots"),


use rule report_tables as report_tables_variant with:
    input:
        metrics=f"{VARIANT}/metrics.json",
        predictions=f"{VARIANT}/predictions.json",
    output:
        metrics=f"{VARIANT}/report/metrics.html",
        predictions=f"{VARIANT}/report/predictions.html",
    log:
        f"{VARIANT}/logs/report_tables.log",
    params:
        cmd=variant_cmd("report_tables"),


use rule provenance as provenance_variant with:
    input:
        f"{VARIANT}/metrics.json",
        image_records(CFG),
    output:
        f"{VARIANT}/provenance.json",
    log:
        f"{VARIANT}/logs/provenance.log",
    params:
        cmd=variant_cmd("provenance"),


# every variant side by side: metrics (best marked), loss curves on one plot, stage times, the
# config keys that differ, the same dev prompts answered by each
rule comparison:
    input:
        comparison_inputs,
    output:
        html=report(
            COMPARISON_HTML, caption="../report/comparison.rst", category="Variants"
        ),
        tsv=COMPARISON_TSV,
    log:
        "results/variants/logs/comparison.log",
    conda:
        CONDA_ENV
    params:
        cmd=rule_cmd("comparison", variants=tuple(VARIANTS)),
    shell:
        "{params.cmd} > {log} 2>&1"
