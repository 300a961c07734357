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
    warnings.filterwarnings("ignore", message=".*ccache.*")
    warnings.filterwarnings("ignore", message=".*distutils.*")


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import paddle

    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)


def quiet_paddlenlp() -> None:
    """PaddleNLP's logger prints every training argument at DEBUG; keep INFO (loss lines)."""
    try:
        from paddlenlp.utils.log import logger

        logger.set_level("INFO")
    except Exception:  # older/newer PaddleNLP: keep its default
        logging.getLogger(__name__).debug("could not lower PaddleNLP log level")
