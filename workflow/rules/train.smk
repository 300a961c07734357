rule init_model:
    input:
        train=PATHS["train"],
    output:
        directory(PATHS["base_model"]),
    log:
        log_of("init_model"),
    benchmark:
        bench_of("init_model")
    conda:
        CONDA_ENV
    threads: config["threads"]
    params:
        args=stage_params("init_model"),
        seed=config["seed"],
    shell:
        "llamapipe init-model --params {params.args:q} --seed {params.seed} --threads {threads}"
        " --train {input.train} --out {output} > {log} 2>&1"


rule sft:
    input:
        train=PATHS["train"],
        base=PATHS["base_model"],
    output:
        directory(PATHS["sft"]),
    log:
        log_of("sft"),
    benchmark:
        bench_of("sft")
    conda:
        CONDA_ENV
    threads: config["threads"]
    params:
        args=stage_params("sft"),
        seed=config["seed"],
        ckpt=PATHS["sft_checkpoints"],
    shell:
        "llamapipe sft --params {params.args:q} --seed {params.seed} --threads {threads}"
        " --train {input.train} --base {input.base} --out {output} --ckpt-dir {params.ckpt}"
        " > {log} 2>&1"


rule merge:
    input:
        sft=PATHS["sft"],
        base=PATHS["base_model"],
    output:
        directory(PATHS["merged"]),
    log:
        log_of("merge"),
    benchmark:
        bench_of("merge")
    conda:
        CONDA_ENV
    params:
        args=stage_params("merge"),
    shell:
        "llamapipe merge --params {params.args:q} --sft {input.sft} --base {input.base}"
        " --out {output} > {log} 2>&1"
