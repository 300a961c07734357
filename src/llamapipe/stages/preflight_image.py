"""preflight_image: the Ascend stack inside the stage image, checked as the stages run it.

``llamapipe preflight-image`` (rule preflight_image, npu only) runs the image checks of
``llamapipe.npu.ascend_checks`` (CANN toolkit and kernels, ATB, the plugin's libraries, the
pinned Python stack, /dev/shm) through the stages' own CANN prelude; every check is one line of
the table on stderr, every failure is listed at once. Stdlib only, Python 3.9 compatible.
"""

from __future__ import annotations

import sys
from typing import Any

from llamapipe.core.atomic import write_json
from llamapipe.core.errors import PipelineError
from llamapipe.npu import ascend_checks


def run(params: dict[str, Any], out_file: str, host: ascend_checks.Host | None = None) -> dict[str, Any]:
    """``llamapipe preflight-image``: the image checks, the table on stderr, the report in
    ``out_file`` (written only when every check passes; the failures raise, all listed)."""
    host = host or ascend_checks.Host(**(params.get("host") or {}))
    records, facts = ascend_checks.image_checks(host, params)
    print(ascend_checks.format_table(records), file=sys.stderr, flush=True)
    problems = [f"{r['name']}: {r['verdict']}" for r in ascend_checks.failed(records)]
    report = {"where": "image", "python": sys.version.split()[0], **facts, "checks": records, "problems": problems}
    if problems:
        raise PipelineError("image preflight failed:\n  - " + "\n  - ".join(problems))
    write_json(out_file, report)
    return {"checks": len(records), "skipped": sum(1 for r in records if r["skipped"]), "out": out_file}
