"""`make bench`: every benchmark in one go; tables on stdout, JSON + PNG + README.md in bench/results/.

python bench/run_all.py [--quick]

Full run (about 13 minutes on 2 CPU cores, plus bench_serve's): analytic FLOPs/KV of five real
architectures, measured latency at realistic widths (plus peak memory per keep ratio), node
throughput over DDS, the ATP core, warehouse-tiny at 640x480, answer reuse on warehouse-cell episodes
(about 3 min), Ray Serve throughput vs camera
streams with batching on and off, CPU bfloat16 autocast vs float32 for the cell's tower training (about
1.5 min). ``--quick``: a smoke run of each (small shapes, few rounds; the tiny-width pipeline table lives
only here), its files suffixed ``_quick``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

FULL = (
    "bench_flops.py",
    "bench_realistic.py",
    "bench_node.py",
    "bench_atp.py",
    "bench_warehouse.py",
    "bench_reuse.py",
    "bench_token_reuse.py",
    "bench_serve.py",
    "bench_cpu_bf16.py",
)
QUICK = (
    "bench_flops.py",
    "bench_realistic.py",
    "bench_atp.py",
    "bench_pipeline.py",
    "bench_warehouse.py",
    "bench_reuse.py",
    "bench_token_reuse.py",
    "bench_serve.py",
    "bench_cpu_bf16.py",
)


def main() -> int:
    """Run each benchmark in its own process, then the summary; 1 when any failed."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the CI smoke set, few repeats, results under results/quick")
    quick = ap.parse_args().quick
    here = Path(__file__).parent
    failed = []
    started = time.monotonic()
    for name in QUICK if quick else FULL:
        args = ["--quick"] if quick and name != "bench_flops.py" else []
        if quick and name in ("bench_atp.py", "bench_pipeline.py", "bench_warehouse.py", "bench_reuse.py",
                                 "bench_token_reuse.py", "bench_cpu_bf16.py"):  # fmt: skip
            args += ["--out", str(here / "results" / "quick")]  # smoke numbers never replace the full ones
        print(f"\n=== {name} {' '.join(args)}", flush=True)
        t0 = time.monotonic()
        if subprocess.call([sys.executable, str(here / name), *args]) != 0:
            failed.append(name)
        print(f"=== {name}: {time.monotonic() - t0:.0f} s", flush=True)
    subprocess.call([sys.executable, str(here / "summary.py")])
    print(f"\nmake bench: {time.monotonic() - started:.0f} s in all")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
