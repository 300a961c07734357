"""``python -m llamapipe.npu.cpu_shims`` as a script path, for ``paddle.distributed.launch``
(the rehearsal's training under the launcher: upstream's run_finetune.py with the CPU shims).

Like ``cli_script.py``: the launcher starts a script, not a module, and this directory holds
nothing that the script's directory on ``sys.path`` could shadow. Python 3.9 compatible.
"""

from llamapipe.npu.cpu_shims import main

if __name__ == "__main__":
    main()
