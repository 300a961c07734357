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
    conda:
        CONDA_ENV
    params:
        args=stage_params("download"),
        out=lambda wildcards, output: os.path.dirname(output.train),
        cache=PATHS["download_cache"],
    shell:
        "llamapipe download --params {params.args:q} --out {params.out} --cache-dir {params.cache}"
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
    conda:
        CONDA_ENV
    params:
        args=stage_params("prepare_data"),
        src=lambda wildcards, input: os.path.dirname(input[0]),
        out=lambda wildcards, output: os.path.dirname(output.train),
    shell:
        "llamapipe prepare-data --params {params.args:q} --src {params.src} --out {params.out}"
        " > {log} 2>&1"
