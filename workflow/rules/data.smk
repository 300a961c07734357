rule download_data:
    input:
        PATHS["preflight"],
    output:
        train=f"{PATHS['raw_data']}/train.json",
        dev=f"{PATHS['raw_data']}/dev.json",
    log:
        log_of("download_data"),
    benchmark:
        bench_of("download_data")
    params:
        args=stage_params("download"),
        out=PATHS["raw_data"],
        cache=PATHS["download_cache"],
    shell:
        "{CLI} download --params {params.args:q} --out {params.out} --cache-dir {params.cache}"
        " > {log} 2>&1"


rule prepare_data:
    input:
        rules.download_data.output,
    output:
        train=PATHS["train"],
        dev=PATHS["dev"],
        report=f"{PATHS['data']}/report.json",
    log:
        log_of("prepare_data"),
    benchmark:
        bench_of("prepare_data")
    params:
        args=stage_params("prepare_data"),
        src=PATHS["raw_data"],
        out=PATHS["data"],
    shell:
        "{CLI} prepare-data --params {params.args:q} --src {params.src} --out {params.out}"
        " > {log} 2>&1"
