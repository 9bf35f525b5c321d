"""The pinhole camera model shared by the simulator and the planner: intrinsics as in sensor_msgs/CameraInfo, the
optical frame's pose in the robot base frame (from parameters: no tf2 here), projection and back-projection.

Frames (REP 103/105 conventions):

- ``rail``: the robot base frame. The Panda rides a rail; ``rail`` is fixed to the rail's zero (the carriage at
  joint position 0), x along the rail, z up. It is the cell's world frame shifted by :data:`RAIL_ORIGIN`.
- ``camera_optical``: x right, y down, z forward (REP 103's optical frame); a 32FC1 depth image holds each
  pixel's z in it (planar depth, meters).

The camera pose is ``camera.position`` [x, y, z] and ``camera.orientation`` [qx, qy, qz, qw] of the optical frame
in ``rail``: what ``ros2 run tf2_ros static_transform_publisher --frame-id rail --child-frame-id camera_optical``
would publish. No MuJoCo or ROS import here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BASE_FRAME = "rail"
OPTICAL_FRAME = "camera_optical"
# The rail's zero in the cell's world frame (scene.RAIL_Y; a test checks the two agree).
RAIL_ORIGIN = np.array([0.0, -0.6, 0.0])
# The cell's nominal camera (scene.build_xml): eye and the point it looks at, in the world frame, and its fovy.
NOMINAL_EYE, NOMINAL_TARGET, NOMINAL_FOVY = (-0.7, -4.5, 2.9), (0.4, -0.1, 0.55), 42.0


def quat_from_matrix(rot: np.ndarray) -> np.ndarray:
    """Quaternion [x, y, z, w] of a 3x3 rotation matrix (ROS order)."""
    m = np.asarray(rot, float)
    w = math.sqrt(max(0.0, 1.0 + m[0, 0] + m[1, 1] + m[2, 2])) / 2
    x = math.copysign(math.sqrt(max(0.0, 1.0 + m[0, 0] - m[1, 1] - m[2, 2])) / 2, m[2, 1] - m[1, 2])
    y = math.copysign(math.sqrt(max(0.0, 1.0 - m[0, 0] + m[1, 1] - m[2, 2])) / 2, m[0, 2] - m[2, 0])
    z = math.copysign(math.sqrt(max(0.0, 1.0 - m[0, 0] - m[1, 1] + m[2, 2])) / 2, m[1, 0] - m[0, 1])
    q = np.array([x, y, z, w])
    return q / np.linalg.norm(q)


def matrix_from_quat(quat) -> np.ndarray:
    """3x3 rotation matrix of a quaternion [x, y, z, w]; ValueError for a zero or non-finite quaternion."""
    q = np.asarray(quat, float)
    if q.shape != (4,) or not np.all(np.isfinite(q)) or np.linalg.norm(q) < 1e-9:
        raise ValueError(f"camera.orientation must be 4 finite numbers [qx, qy, qz, qw], not {list(quat)}")
    x, y, z, w = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def look_at_optical(eye, target) -> np.ndarray:
    """Rotation (columns: x right, y down, z forward) of an optical frame at ``eye`` looking at ``target``, z up."""
    eye, target = np.asarray(eye, float), np.asarray(target, float)
    forward = target - eye
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, (0.0, 0.0, 1.0))
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    return np.column_stack([right, down, forward])


def nominal_pose() -> tuple[list[float], list[float]]:
    """(camera.position, camera.orientation) of the cell's nominal camera in the ``rail`` frame."""
    position = np.asarray(NOMINAL_EYE) - RAIL_ORIGIN
    return [round(float(v), 6) for v in position], [
        round(float(v), 6) for v in quat_from_matrix(look_at_optical(NOMINAL_EYE, NOMINAL_TARGET))
    ]


@dataclass(frozen=True)
class PinholeCamera:
    """Intrinsics (``fx, fy, cx, cy`` in pixels, as CameraInfo's K) and the optical frame's pose in ``rail``."""

    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float
    position: np.ndarray  # optical frame origin in the base frame
    rotation: np.ndarray  # 3x3, columns: the optical frame's axes in the base frame

    @classmethod
    def from_fovy(cls, width: int, height: int, fovy_deg: float, position, orientation) -> PinholeCamera:
        """A camera with a vertical field of view ``fovy_deg`` and square pixels, its center at the image center."""
        f = 0.5 * height / math.tan(math.radians(fovy_deg) / 2)
        return cls(
            width, height, f, f, width / 2, height / 2, np.asarray(position, float), matrix_from_quat(orientation)
        )

    @classmethod
    def from_k(cls, width: int, height: int, k, position, orientation) -> PinholeCamera:
        """From a CameraInfo's row-major 3x3 ``k``; ValueError when it is not a pinhole matrix."""
        k = np.asarray(k, float).reshape(3, 3)
        if k[0, 0] <= 0 or k[1, 1] <= 0 or not np.all(np.isfinite(k)):
            raise ValueError(f"CameraInfo K has no positive focal length: {k.ravel().tolist()}")
        return cls(
            width,
            height,
            k[0, 0],
            k[1, 1],
            k[0, 2],
            k[1, 2],
            np.asarray(position, float),
            matrix_from_quat(orientation),
        )

    def k(self) -> list[float]:
        """CameraInfo's K, row-major."""
        return [self.fx, 0.0, self.cx, 0.0, self.fy, self.cy, 0.0, 0.0, 1.0]

    def p(self) -> list[float]:
        """CameraInfo's P (a monocular camera: K with a zero fourth column)."""
        return [self.fx, 0.0, self.cx, 0.0, 0.0, self.fy, self.cy, 0.0, 0.0, 0.0, 1.0, 0.0]

    def project(self, points) -> np.ndarray:
        """Pixels (u right, v down) of base-frame points, shape (n, 2); NaN rows for points behind the camera."""
        local = (np.atleast_2d(np.asarray(points, float)) - self.position) @ self.rotation
        z = local[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            uv = np.column_stack([self.cx + self.fx * local[:, 0] / z, self.cy + self.fy * local[:, 1] / z])
        uv[z <= 0] = np.nan
        return uv

    def ray(self, u: float, v: float) -> np.ndarray:
        """Unit direction in the base frame of the ray through pixel (u, v)."""
        d = self.rotation @ np.array([(u - self.cx) / self.fx, (v - self.cy) / self.fy, 1.0])
        return d / np.linalg.norm(d)

    def backproject(self, u: float, v: float, depth: float) -> np.ndarray:
        """The base-frame point at planar ``depth`` (meters along the optical axis) through pixel (u, v)."""
        local = np.array([(u - self.cx) / self.fx * depth, (v - self.cy) / self.fy * depth, depth])
        return self.position + self.rotation @ local

    def intersect_plane_y(self, u: float, v: float, y: float) -> np.ndarray | None:
        """Where the ray through (u, v) meets the vertical plane ``y`` = const of the base frame (None: never)."""
        d = self.ray(u, v)
        if abs(d[1]) < 1e-9:
            return None
        t = (y - self.position[1]) / d[1]
        return self.position + t * d if t > 0 else None


def box_depth(depth: np.ndarray, box, min_valid: int = 4) -> float | None:
    """Median planar depth (meters) of the finite, positive pixels of ``depth`` inside the pixel box
    (x0, y0, x1, y1); None when fewer than ``min_valid`` pixels there are valid."""
    h, w = depth.shape
    x0, y0, x1, y1 = (round(float(b)) for b in box)
    x0, x1 = max(0, min(x0, x1)), min(w, max(x0, x1) + 1)
    y0, y1 = max(0, min(y0, y1)), min(h, max(y0, y1) + 1)
    patch = depth[y0:y1, x0:x1]
    valid = patch[np.isfinite(patch) & (patch > 0)]
    return float(np.median(valid)) if valid.size >= min_valid else None
