"""``python -m llamapipe`` as a script path, for ``paddle.distributed.launch``.

The launcher starts ``python -u <path>.py args``; it cannot start a module (``python -m ...`` as
its entry: its parser takes ``-m`` for one of its own options).
This directory holds nothing else, so the script's directory on ``sys.path`` shadows nothing.
"""

from llamapipe.cli import main

if __name__ == "__main__":
    main()
