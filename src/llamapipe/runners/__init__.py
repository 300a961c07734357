"""Where a stage runs: on the host (a subprocess) or inside a container (the docker SDK).

``llamapipe.runners.container`` holds the container runner: ``ContainerSpec``, ``npu_devices``,
``npu_driver_mounts``, ``container_create_kwargs``, ``run_in_container`` and the
``container-run`` subcommand. Nothing is imported here eagerly, so stage code (which also runs
inside the py39 paddle-npu image, where the docker SDK is absent) can import this package.
"""
