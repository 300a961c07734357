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
        cmd=stage_cmd(
            "export", "--merged", PATHS["merged"], "--out", PATHS["inference"]
        ),
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
    # predict.threads: paddle.inference's CPU threads (measured default 1, bench/RESULTS.md)
    threads: CFG["predict"]["threads"] or CFG["threads"]
    resources:
        npu=npu_cards("predict"),
    params:
        cmd=stage_cmd(
            "predict",
            "--inference",
            PATHS["inference"],
            "--dev",
            PATHS["dev"],
            "--out",
            PATHS["predictions"],
            threads=CFG["predict"]["threads"] or CFG["threads"],
        ),
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
        cmd=stage_cmd(
            "evaluate",
            "--predictions",
            PATHS["predictions"],
            "--out",
            PATHS["metrics"],
        ),
    shell:
        "{params.cmd} > {log} 2>&1"
