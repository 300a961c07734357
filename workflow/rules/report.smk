# What a person looks at: plots, tables and provenance, collected by `snakemake --report`.


rule plots:
    input:
        sft=PATHS["sft"],  # a directory output: its train_log.jsonl is read by the command
        benchmarks=stage_benchmarks(CFG),
    output:
        loss=report(
            f"{PATHS['plots']}/loss.png",
            caption="../report/loss.rst",
            category="Training",
        ),
        times=report(
            f"{PATHS['plots']}/stage_times.png",
            caption="../report/stage_times.rst",
            category="Run",
        ),
    log:
        log_of("plots"),
    conda:
        CONDA_ENV
    params:
        cmd=rule_cmd("plots"),
    shell:
        "{params.cmd} > {log} 2>&1"


rule report_tables:
    input:
        metrics=PATHS["metrics"],
        predictions=PATHS["predictions"],
    output:
        metrics=report(
            f"{PATHS['report_tables']}/metrics.html",
            caption="../report/metrics.rst",
            category="Evaluation",
        ),
        predictions=report(
            f"{PATHS['report_tables']}/predictions.html",
            caption="../report/predictions.rst",
            category="Evaluation",
        ),
    log:
        log_of("report_tables"),
    conda:
        CONDA_ENV
    params:
        cmd=rule_cmd("report_tables"),
    shell:
        "{params.cmd} > {log} 2>&1"


rule provenance:
    input:
        PATHS["metrics"],
        image_records(CFG),
    output:
        report(PATHS["provenance"], caption="../report/provenance.rst", category="Run"),
    log:
        log_of("provenance"),
    conda:
        CONDA_ENV
    params:
        cmd=rule_cmd("provenance"),
    shell:
        "{params.cmd} > {log} 2>&1"
