rule preflight:
    output:
        PATHS["preflight"],
    log:
        log_of("preflight"),
    benchmark:
        bench_of("preflight")
    conda:
        CONDA_ENV
    params:
        args=stage_params("preflight"),
    shell:
        "llamapipe preflight --params {params.args:q} --out {output} > {log} 2>&1"
