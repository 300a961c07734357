"""Process-level set-up before Paddle is imported: threads, quiet logs, device.

Paddle reads OMP/MKL thread counts and glog levels at import time, so the CLI calls
``prepare(threads)`` first and stages import Paddle only inside their ``run``.
"""

from __future__ import annotations

import logging
import os
import warnings


def prepare(threads: int | None = None) -> None:
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(threads)
    # Paddle's C++ INFO logging floods rule logs with pass statistics.
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("FLAGS_call_stack_level", "2")
    # colorlog (PaddleNLP's logger) writes colour codes even into a pipe or file; NO_COLOR (read at
    # each format, inherited by launched workers) keeps rule logs plain text
    os.environ.setdefault("NO_COLOR", "1")
    warnings.filterwarnings("ignore", message=".*ccache.*")
    warnings.filterwarnings("ignore", message=".*distutils.*")


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import paddle

    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)


# PaddleNLP's log line without colorlog's colour fields: what it prints, as plain text
PADDLENLP_FORMAT = "[%(asctime)-15s] [%(levelname)8s] - %(message)s"


def quiet_paddlenlp() -> None:
    """PaddleNLP's logger prints every training argument at DEBUG; keep INFO (loss lines). Its
    handler's colorlog formatter is swapped for a plain one (a colorlog too old for NO_COLOR)."""
    try:
        from paddlenlp.utils.log import logger

        logger.set_level("INFO")
        logger.handler.setFormatter(logging.Formatter(PADDLENLP_FORMAT))
    except Exception:  # older/newer PaddleNLP: keep its default
        logging.getLogger(__name__).debug("could not lower PaddleNLP log level")
