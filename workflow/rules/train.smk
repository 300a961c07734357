rule init_model:
    input:
        PATHS["train"],
        image_inputs(),
    output:
        directory(PATHS["base_model"]),
    log:
        log_of("init_model"),
    benchmark:
        bench_of("init_model")
    conda:
        CONDA_ENV
    threads: CFG["threads"]
    resources:
        npu=npu_cards("init_model"),
    params:
        cmd=rule_cmd("init_model", threads=CFG["threads"]),
    shell:
        "{params.cmd} > {log} 2>&1"


# npu only: an all-reduce and a matmul on every card sft uses, in sft's environment, through
# sft's launcher, under npu.smoke_timeout_s (an HCCL hang fails here, not hours into sft).
rule smoke_collective:
    input:
        image_inputs(),
        upstream_inputs(),
    output:
        PATHS["smoke_collective"],
    log:
        log_of("smoke_collective"),
    benchmark:
        bench_of("smoke_collective")
    conda:
        CONDA_ENV
    threads: CFG["threads"]
    resources:
        npu=npu_cards("smoke_collective"),
    params:
        cmd=rule_cmd("smoke_collective", threads=CFG["threads"]),
    shell:
        "{params.cmd} > {log} 2>&1"


rule sft:
    input:
        PATHS["train"],
        PATHS["base_model"],
        image_inputs(),
        plan_inputs(),
        upstream_inputs(),
        smoke_inputs(),
    output:
        directory(PATHS["sft"]),
    log:
        log_of("sft"),
    benchmark:
        bench_of("sft")
    conda:
        CONDA_ENV
    threads: CFG["threads"]
    resources:
        npu=npu_cards("sft"),
        # a SLURM job over the nodes when srun starts the launchers (profiles/slurm)
        nodes=sft_nodes(),
    params:
        cmd=rule_cmd("sft", threads=CFG["threads"]),
    # the whole output into the log; our own lines (progress: step/total, loss, rate, time left)
    # also on the terminal. pipefail (Snakemake's bash) keeps the command's exit status.
    shell:
        "{params.cmd} 2>&1 | tee {log} | python -m llamapipe.stages.progress"


rule merge:
    input:
        PATHS["sft"],
        PATHS["base_model"],
        image_inputs(),
        upstream_inputs(),
    output:
        directory(PATHS["merged"]),
    log:
        log_of("merge"),
    benchmark:
        bench_of("merge")
    conda:
        CONDA_ENV
    resources:
        npu=npu_cards("merge"),
    params:
        cmd=rule_cmd("merge"),
    shell:
        "{params.cmd} > {log} 2>&1"
