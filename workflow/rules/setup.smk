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
        # host checks: never in a container (they check the host the containers need)
        cmd=rule_cmd("preflight"),
    shell:
        "{params.cmd} > {log} 2>&1"


rule pull_image:
    input:
        PATHS["preflight"],
    output:
        PATHS["base_image"],
    log:
        log_of("pull_image"),
    benchmark:
        bench_of("pull_image")
    conda:
        CONDA_ENV
    params:
        cmd=rule_cmd("pull_image"),
    shell:
        "{params.cmd} > {log} 2>&1"


rule build_image:
    input:
        base=PATHS["base_image"],
        dockerfile="Dockerfile.npu",
    output:
        PATHS["image"],
    log:
        log_of("build_image"),
    benchmark:
        bench_of("build_image")
    conda:
        CONDA_ENV
    params:
        cmd=rule_cmd("build_image"),
    shell:
        "{params.cmd} > {log} 2>&1"


# npu only: CANN, kernels, ATB, the plugin's libraries, the Python stack and /dev/shm, checked
# inside the stage image as the stages run (llamapipe.npu.ascend_checks); every stage waits for it.
rule preflight_image:
    input:
        image_records(CFG)[1:] or PATHS["preflight"],
        upstream_inputs(),
    output:
        PATHS["image_preflight"],
    log:
        log_of("preflight_image"),
    benchmark:
        bench_of("preflight_image")
    conda:
        CONDA_ENV
    resources:
        npu=npu_cards("preflight_image"),
    params:
        cmd=rule_cmd("preflight_image"),
    shell:
        "{params.cmd} > {log} 2>&1"


rule build_ops:
    input:
        image_inputs(),
        upstream_inputs(),
    output:
        directory(PATHS["wheels"]),
    log:
        log_of("build_ops"),
    benchmark:
        bench_of("build_ops")
    conda:
        CONDA_ENV
    params:
        cmd=rule_cmd("build_ops"),
    shell:
        "{params.cmd} > {log} 2>&1"


# After preflight: the HBM it measured (hbm_gib_per_card) caps npu.memory_per_card_gb. Without
# hardware, `llamapipe plan ...` (the same arguments) plans anywhere.
rule plan:
    input:
        PATHS["preflight"],
    output:
        PATHS["plan"],
    log:
        log_of("plan"),
    benchmark:
        bench_of("plan")
    conda:
        CONDA_ENV
    params:
        cmd=rule_cmd("plan"),
    shell:
        "{params.cmd} > {log} 2>&1"


# The rehearsal without a given checkout: PaddleNLP at the pinned commit, cloned once into .cache/.
rule paddlenlp_checkout:
    output:
        directory(PADDLENLP_CLONE or ".cache/PaddleNLP"),
    log:
        log_of("paddlenlp_checkout"),
    conda:
        CONDA_ENV
    params:
        cmd=rule_cmd("paddlenlp_checkout"),
    shell:
        "{params.cmd} > {log} 2>&1"
