rule download_data:
    input:
        PATHS["preflight"],
        image_inputs(),
    output:
        train=f"{PATHS['raw_data']}/train.json",
        dev=f"{PATHS['raw_data']}/dev.json",
    log:
        log_of("download_data"),
    benchmark:
        bench_of("download_data")
    conda:
        CONDA_ENV
    params:
        cmd=rule_cmd("download_data"),
    shell:
        # On the terminal too: what is fetched, each retry. Snakemake's bash runs with
        # `set -euo pipefail`, so the stage's exit status survives the pipe.
        "{params.cmd} 2>&1 | tee {log}"


rule prepare_data:
    input:
        rules.download_data.output,
        image_inputs(),
    output:
        train=PATHS["train"],
        dev=PATHS["dev"],
        report=f"{PATHS['data']}/report.json",
    log:
        log_of("prepare_data"),
    benchmark:
        bench_of("prepare_data")
    conda:
        CONDA_ENV
    params:
        cmd=rule_cmd("prepare_data"),
    shell:
        "{params.cmd} > {log} 2>&1"
