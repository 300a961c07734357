"""Import only the parts of PaddleNLP a stage uses, without the package's eager ``__init__``.

PaddleNLP 3.0's ``paddlenlp/__init__.py`` imports every subpackage at once: taskflow (which
pulls seqeval -> scikit-learn -> scipy.stats), server (fastapi), dataaug, datasets (Hugging Face
datasets, pyarrow) and more. init-model and export use ``paddlenlp.transformers`` alone, and the
rest is ~2.8 s of every such process (bench/RESULTS.md, issue 12).

``import_parts`` registers the package module from its own spec without running its
``__init__``: every submodule still imports on first use through the package's ``__path__``.
It sets what the parts read from the package (``__version__``, the installed distribution's),
repeats the ``__init__``'s one side effect (``paddle.disable_signal_handler()``), then imports
the parts. PaddleNLP's subpackages import each other in cycles that resolve only in the
``__init__``'s own order, so parts are given in that order (``data`` before ``transformers``).
A cycle entered in another order fails loudly (ImportError), never silently.

tests/test_paddlenlp_import.py pins the ``__init__`` this relies on: a PaddleNLP upgrade whose
``__init__`` does anything new fails that test. ``LLAMAPIPE_PADDLENLP_FULL_IMPORT=1`` imports the
whole package the usual way (to rule this module out when something looks wrong); so does a
PaddleNLP other than the installed distribution (a checkout on ``PYTHONPATH``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

FULL_IMPORT_ENV = "LLAMAPIPE_PADDLENLP_FULL_IMPORT"
# What init-model and export use: the model, config and tokenizer classes.
TRANSFORMERS = ("data", "transformers")


def import_parts(parts: Sequence[str] | None) -> None:
    """Import ``paddlenlp.<part>`` for each part, in order; ``None`` imports the whole package."""
    import importlib.util

    whole = parts is None or os.environ.get(FULL_IMPORT_ENV) == "1" or "paddlenlp" in sys.modules
    spec = None if whole else importlib.util.find_spec("paddlenlp")
    if spec is None or not _is_the_installed_distribution(spec.origin):  # e.g. a checkout on PYTHONPATH
        importlib.import_module("paddlenlp")  # the usual way (ModuleNotFoundError if it is missing)
        for part in parts or ():
            importlib.import_module(f"paddlenlp.{part}")
        return
    import importlib.metadata

    import paddle

    package = importlib.util.module_from_spec(spec)  # __path__ set, __init__ not run
    package.__version__ = importlib.metadata.version("paddlenlp")
    sys.modules["paddlenlp"] = package
    try:
        for part in parts:
            setattr(package, part, importlib.import_module(f"paddlenlp.{part}"))
    except BaseException:
        # leave no half-made package behind: a later import starts from scratch
        for name in [m for m in sys.modules if m == "paddlenlp" or m.startswith("paddlenlp.")]:
            del sys.modules[name]
        raise
    paddle.disable_signal_handler()


def _is_the_installed_distribution(origin: str | None) -> bool:
    """Only the installed, pinned PaddleNLP is the one whose ``__init__`` the test pins (and whose
    version metadata is the package's ``__version__``)."""
    import importlib.metadata  # here, not at module level: it is half of the CLI's own import time

    try:
        installed = importlib.metadata.distribution("paddlenlp").locate_file("paddlenlp/__init__.py")
    except importlib.metadata.PackageNotFoundError:
        return False
    return origin is not None and os.path.realpath(str(installed)) == os.path.realpath(origin)
