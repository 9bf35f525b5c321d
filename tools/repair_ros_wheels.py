"""Repair CMake export files of ROS 2 PyPI wheels that name the build machine's include folders.

Some Kilted wheels were built in a manylinux container and their
``*__rosidl_generator_pyExport.cmake`` files list
``/opt/python/cp311-cp311/include/python3.11`` and that container's NumPy include
folder as INTERFACE_INCLUDE_DIRECTORIES. CMake refuses targets whose include
folders do not exist, so an interfaces package cannot be built against them.
This script rewrites those two paths to this interpreter's own folders. It is
idempotent and prints what it changed.
"""

from __future__ import annotations

import re
import sys
import sysconfig
from pathlib import Path

import numpy

# The foreign prefix: any /opt/python/cpXY-cpXY tree (the manylinux layout).
_FOREIGN_PYTHON_INCLUDE = re.compile(r"/opt/python/cp\d+-cp\d+t?/include/python3\.\d+t?")
_FOREIGN_NUMPY_INCLUDE = re.compile(
    r"/opt/python/cp\d+-cp\d+t?/lib/python3\.\d+t?/site-packages/numpy/(?:_core|core)/include"
)


def repair(prefix: Path) -> list[Path]:
    """Rewrite foreign include folders in ``prefix/share/*/cmake/*.cmake``; return changed files."""
    python_include = sysconfig.get_paths()["include"]
    numpy_include = numpy.get_include()
    changed = []
    for path in sorted(prefix.glob("share/*/cmake/*.cmake")):
        text = path.read_text()
        if "/opt/python/" not in text:
            continue
        new = _FOREIGN_NUMPY_INCLUDE.sub(numpy_include, text)
        new = _FOREIGN_PYTHON_INCLUDE.sub(python_include, new)
        if new != text:
            path.write_text(new)
            changed.append(path)
    return changed


def main() -> int:
    prefix = Path(sys.argv[1] if len(sys.argv) > 1 else sys.prefix)
    changed = repair(prefix)
    if changed:
        print(
            f"repair_ros_wheels: rewrote build-machine include folders (/opt/python/...) to "
            f"{sysconfig.get_paths()['include']} and {numpy.get_include()} in {len(changed)} CMake files:"
        )
        for path in changed:
            print(f"  {path.relative_to(prefix)}")
    else:
        print("repair_ros_wheels: no foreign include folders found in ROS wheel CMake files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
