rule export:
    input:
        PATHS["merged"],
    output:
        directory(PATHS["inference"]),
    log:
        log_of("export"),
    benchmark:
        bench_of("export")
    conda:
        CONDA_ENV
    params:
        args=stage_params("export"),
    shell:
        "llamapipe export --params {params.args:q} --merged {input} --out {output} > {log} 2>&1"


rule predict:
    input:
        inference=PATHS["inference"],
        dev=PATHS["dev"],
    output:
        PATHS["predictions"],
    log:
        log_of("predict"),
    benchmark:
        bench_of("predict")
    conda:
        CONDA_ENV
    threads: config["threads"]
    params:
        args=stage_params("predict"),
    shell:
        "llamapipe predict --params {params.args:q} --threads {threads} --inference {input.inference}"
        " --dev {input.dev} --out {output} > {log} 2>&1"


rule evaluate:
    input:
        PATHS["predictions"],
    output:
        PATHS["metrics"],
    log:
        log_of("evaluate"),
    benchmark:
        bench_of("evaluate")
    conda:
        CONDA_ENV
    shell:
        "llamapipe evaluate --predictions {input} --out {output} > {log} 2>&1"
