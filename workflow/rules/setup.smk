rule preflight:
    output:
        PATHS["preflight"],
    log:
        log_of("preflight"),
    benchmark:
        bench_of("preflight")
    params:
        args=stage_params("preflight"),
    shell:
        "{CLI} preflight --params {params.args:q} --out {output} > {log} 2>&1"
