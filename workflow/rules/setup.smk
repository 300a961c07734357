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
        cmd=shell_join(
            "llamapipe",
            "preflight",
            "--params",
            stage_params("preflight"),
            "--out",
            PATHS["preflight"],
        ),
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
        cmd=shell_join(
            "llamapipe",
            "pull-image",
            "--image",
            CFG["npu"]["image"]["base"],
            "--out",
            PATHS["base_image"],
        ),
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
        cmd=shell_join(
            "llamapipe",
            "build-image",
            "--dockerfile",
            "Dockerfile.npu",
            "--tag",
            CFG["npu"]["image"]["tag"],
            "--build-args",
            json.dumps(npu_build_args(), sort_keys=True),
            "--out",
            PATHS["image"],
        ),
    shell:
        "{params.cmd} > {log} 2>&1"


rule build_ops:
    input:
        image_records()[1:] or PATHS["preflight"],
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
        cmd=build_ops_cmd(),
    shell:
        "{params.cmd} > {log} 2>&1"


# Pure computation (no hardware): `snakemake results/plan.json --config target=npu` works anywhere.
rule plan:
    output:
        PATHS["plan"],
    log:
        log_of("plan"),
    benchmark:
        bench_of("plan")
    conda:
        CONDA_ENV
    params:
        cmd=shell_join("llamapipe", "plan", *plan_args(), "--out", PATHS["plan"]),
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
        cmd=shell_join(
            "llamapipe",
            "fetch-paddlenlp",
            "--repo",
            CFG["npu"]["image"]["paddlenlp_repo"],
            "--commit",
            CFG["npu"]["image"]["paddlenlp_commit"],
            "--out",
            PADDLENLP_CLONE or ".cache/PaddleNLP",
        ),
    shell:
        "{params.cmd} > {log} 2>&1"
