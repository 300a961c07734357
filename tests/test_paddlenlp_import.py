"""llamapipe.core.paddlenlp_import: init-model and export import PaddleNLP's transformers part only.

Each check runs in a fresh interpreter (what is imported is per process). That the stages give
the same outputs this way is the e2e tests' (tests/test_pipeline_e2e.py: static == dygraph tokens).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys

from conftest import ROOT

HEAVY = ["paddlenlp.taskflow", "paddlenlp.server", "paddlenlp.dataaug", "sklearn", "fastapi", "datasets"]


def _run(code: str, **env: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


PROBE = f"""
import json, sys, importlib.metadata
import paddle
calls = []
paddle.disable_signal_handler = lambda: calls.append("disable_signal_handler")
from llamapipe.core.paddlenlp_import import TRANSFORMERS, import_parts
import_parts(TRANSFORMERS)
from paddlenlp.transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaTokenizer
import paddlenlp
print(json.dumps({{"heavy": [m for m in {HEAVY!r} if m in sys.modules], "calls": calls,
                   "version": paddlenlp.__version__, "dist": importlib.metadata.version("paddlenlp"),
                   "auto": AutoModelForCausalLM.__name__}}))
"""


def test_transformers_part_imports_without_the_eager_subpackages():
    got = _run(PROBE)
    assert got["heavy"] == []
    assert got["calls"] == ["disable_signal_handler"]  # the package __init__'s one side effect
    assert got["version"] == got["dist"] == "3.0.0b4"


def test_the_switch_imports_the_whole_package():
    got = _run(PROBE, LLAMAPIPE_PADDLENLP_FULL_IMPORT="1")
    assert set(got["heavy"]) == set(HEAVY)
    assert got["version"] == "3.0.0b4"


def test_a_part_out_of_order_fails_loudly_and_leaves_nothing_half_made():
    code = """
import json, sys
from llamapipe.core.paddlenlp_import import import_parts
try:
    import_parts(("trainer",))  # its cycle with peft resolves only in the package's own order
    error = None
except ImportError as exc:
    error = str(exc)
left = [m for m in sys.modules if m.startswith("paddlenlp")]
import paddlenlp.trainer  # then the usual import works
print(json.dumps({"error": error, "left": left, "trainer": hasattr(paddlenlp.trainer, "Trainer")}))
"""
    got = _run(code)
    assert got["error"] and "circular import" in got["error"]
    assert got["left"] == [] and got["trainer"] is True


# What PaddleNLP's package __init__ may do for import_parts to stand in for it: set its version,
# import modules, warn about `datasets`, disable Paddle's signal handler. Anything else is new.
KNOWN_EFFECTS = {
    "paddle.disable_signal_handler()",
    "logger.warning('Detected that datasets module was imported before paddlenlp. This may cause PaddleNLP "
    "datasets to be unavalible in intranet. Please import paddlenlp before datasets module to avoid download "
    "issues')",
}
KNOWN_NAMES = {"PADDLENLP_STABLE_VERSION", "__version__", "formatted_date"}


def _effects(body: list) -> list:
    """The statements of a module body that are neither imports nor assignments to known names."""
    out = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id in KNOWN_NAMES for t in node.targets):
            continue
        if isinstance(node, ast.If):
            out += _effects(node.body) + _effects(node.orelse)
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):  # docstring
            continue
        out.append(ast.unparse(node))
    return out


def test_paddlenlps_package_init_does_only_what_import_parts_repeats():
    origin = importlib.util.find_spec("paddlenlp").origin
    tree = ast.parse(open(origin, encoding="utf-8").read())
    assert set(_effects(tree.body)) <= KNOWN_EFFECTS, (
        f"{origin} does something new on import: review llamapipe.core.paddlenlp_import")
    assert "paddle.disable_signal_handler()" in _effects(tree.body)



def test_a_paddlenlp_checkout_on_the_path_is_imported_whole(tmp_path):
    """Not the installed distribution: its __init__ is not the one pinned above, so it runs."""
    for sub in ("", "data", "transformers"):
        (tmp_path / "paddlenlp" / sub).mkdir(exist_ok=True)
        (tmp_path / "paddlenlp" / sub / "__init__.py").write_text("RAN_INIT = True\n")
    code = ("import json; from llamapipe.core.paddlenlp_import import TRANSFORMERS, import_parts; "
            "import_parts(TRANSFORMERS); import paddlenlp, paddlenlp.transformers; "
            "print(json.dumps([paddlenlp.__file__, getattr(paddlenlp, 'RAN_INIT', False)]))")
    origin, ran = _run(code, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT / 'src'}")
    assert origin == str(tmp_path / "paddlenlp/__init__.py") and ran is True
