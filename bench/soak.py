"""``make soak``: the atp_vlm node under a 30 Hz 640x480 camera for minutes: memory, crashes, answers, drops.

The command line over :mod:`atp_ros.ros.soak` (what it runs, the targets and the reports are described
there; the tests run the same code as ``python -m atp_ros.ros.soak``).

    python bench/soak.py --minutes 10 --rate 30 --width 640 --height 480 --out bench/results/soak
"""

from __future__ import annotations

import sys

from atp_ros.ros.soak import main

if __name__ == "__main__":
    sys.exit(main(prog="python bench/soak.py"))
