"""`make bench`: every benchmark in one go; tables on stdout, JSON + PNG in out/bench/.

python bench/run_all.py [--quick]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHES = ("bench_atp.py", "bench_pipeline.py", "bench_warehouse.py")


def main() -> int:
    extra = sys.argv[1:]
    here = Path(__file__).parent
    failed = []
    for name in BENCHES:
        print(f"\n=== {name} {' '.join(extra)}", flush=True)
        if subprocess.call([sys.executable, str(here / name), *extra]) != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
