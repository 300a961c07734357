rule export:
    input:
        PATHS["merged"],
        image_inputs(wheels=True),
        upstream_inputs(),
    output:
        directory(PATHS["inference"]),
    log:
        log_of("export"),
    benchmark:
        bench_of("export")
    conda:
        CONDA_ENV
    resources:
        npu=npu_cards("export"),
    params:
        cmd=rule_cmd("export"),
    shell:
        "{params.cmd} > {log} 2>&1"


rule predict:
    input:
        PATHS["inference"],
        PATHS["dev"],
        image_inputs(wheels=True),
        upstream_inputs(),
    output:
        PATHS["predictions"],
    log:
        log_of("predict"),
    benchmark:
        bench_of("predict")
    conda:
        CONDA_ENV
    threads: predict_threads(CFG)
    resources:
        npu=npu_cards("predict"),
    params:
        cmd=rule_cmd("predict", threads=predict_threads(CFG)),
    shell:
        "{params.cmd} > {log} 2>&1"


rule evaluate:
    input:
        PATHS["predictions"],
        image_inputs(),
    output:
        PATHS["metrics"],
    log:
        log_of("evaluate"),
    benchmark:
        bench_of("evaluate")
    conda:
        CONDA_ENV
    params:
        cmd=rule_cmd("evaluate"),
    shell:
        "{params.cmd} > {log} 2>&1"
