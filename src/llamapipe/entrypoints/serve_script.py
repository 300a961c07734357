"""``python -m llamapipe.serving.server`` as a script path, for ``llamapipe.npu.cpu_shims``
(the rehearsal's ``llamapipe serve``: our server over upstream's predictor, with the CPU shims the
predict rule's predictor.py runs with; ``cpu_shims`` starts a script, not a module).

Like ``cli_script.py``: this directory holds nothing that the script's directory on ``sys.path``
could shadow. Python 3.9 compatible: it runs inside the stage image.
"""

from llamapipe.serving.server import main

if __name__ == "__main__":
    main()
