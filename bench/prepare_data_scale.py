"""prepare_data at AdvertiseGen scale: records/s validating and writing ~114k train records.

    .venv/bin/python bench/prepare_data_scale.py            # 114,599 train + 1,070 dev, 5 runs
    .venv/bin/python bench/prepare_data_scale.py --quick    # 5,000 + 100, 1 run

The records come from the generator behind the bundled sample (tools/make_sample_data.py,
attribute strings and ad copy in the ADGEN format; no distinct-src filter, so 114k are quick to
make); the real ADGEN has about 114k train and 1k dev records. Each run times
llamapipe.stages.prepare_data.run in this process (read, validate every line, write the splits
and report.json atomically) into a fresh output directory. Target: under 30 s.
"""

from __future__ import annotations

import importlib.util
import json
import random
import time
from pathlib import Path

import _common as C

ADGEN_TRAIN, ADGEN_DEV = 114_599, 1_070


def generate(out_dir: Path, train: int, dev: int, seed: int = 2024) -> dict:
    spec = importlib.util.spec_from_file_location("make_sample_data", C.ROOT / "tools/make_sample_data.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, n in (("train", train), ("dev", dev)):
        path = out_dir / f"{name}.json"
        with open(path, "w", encoding="utf-8") as f:
            for _ in range(n):
                f.write(json.dumps(gen._make_record(rng), ensure_ascii=False) + "\n")
        sizes[name] = path.stat().st_size
    return sizes


def main(argv=None) -> dict:
    ap = C.parser(__doc__)
    ap.add_argument("--train", type=int, default=ADGEN_TRAIN)
    ap.add_argument("--dev", type=int, default=ADGEN_DEV)
    args = ap.parse_args(argv)
    runs, n_train, n_dev = (1, 5_000, 100) if args.quick else (args.runs, args.train, args.dev)
    from llamapipe.stages import prepare_data

    result: dict = {"machine": C.machine(), "quick": args.quick, "train_records": n_train, "dev_records": n_dev}
    with C.workdir(args.keep, "bench-prep-") as tmp:
        src = Path(tmp) / "AdvertiseGen"
        start = time.perf_counter()
        sizes = generate(src, n_train, n_dev)
        result["generate_seconds"] = round(time.perf_counter() - start, 2)
        result["input_mib"] = round(sum(sizes.values()) / 2**20, 1)
        seconds = []
        for r in range(runs):
            start = time.perf_counter()
            report = prepare_data.run(str(src), str(Path(tmp) / f"out-{r}"))
            seconds.append(time.perf_counter() - start)
            assert report["splits"]["train"]["written"] == n_train
    total = n_train + n_dev
    result["seconds"] = C.summary(seconds)
    result["records_per_second"] = C.summary([total / s for s in seconds], 0)
    result["mib_per_second"] = C.summary([result["input_mib"] / s for s in seconds], 1)
    result["target_seconds"] = 30
    return C.emit(result, args.json_out)


if __name__ == "__main__":
    main()
