"""Robustness perturbations (the paper's section 5.2): seeded image corruptions and question rewrites.

Images: ``gaussian_noise``, ``motion_blur``, ``occlusion``, ``brightness``, ``jpeg``, each at
severities 1..3 (mild, medium, strong). Questions: ``paraphrase`` (the same question in other
words) and ``distractor`` (an irrelevant clause added). The same (name, severity, seed) always
gives the same output.
"""

from __future__ import annotations

import re

import cv2
import numpy as np

IMAGE_CORRUPTIONS = ("gaussian_noise", "motion_blur", "occlusion", "brightness", "jpeg")
QUESTION_PERTURBATIONS = ("paraphrase", "distractor")
SEVERITIES = (1, 2, 3)

_NOISE_SIGMA = {1: 10.0, 2: 20.0, 3: 40.0}  # gray levels
_BLUR_LENGTH = {1: 5, 2: 9, 3: 15}  # pixels at 640 px width (scaled with the frame)
_OCCLUDED = {1: 0.08, 2: 0.16, 3: 0.30}  # share of the frame under gray rectangles
_BRIGHTNESS = {1: 1.4, 2: 1.8, 3: 2.4}  # gain (over-exposure)
_JPEG_QUALITY = {1: 30, 2: 15, 3: 6}


def corrupt(rgb: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """``rgb`` ``(H, W, 3)`` uint8 corrupted by ``name`` at ``severity`` (seeded), same shape and dtype."""
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity}")
    rng = np.random.default_rng(seed)
    h, w = rgb.shape[:2]
    if name == "gaussian_noise":
        noisy = rgb.astype(np.float32) + rng.normal(0.0, _NOISE_SIGMA[severity], rgb.shape)
        return np.clip(noisy, 0, 255).astype(np.uint8)
    if name == "motion_blur":
        length = max(3, round(_BLUR_LENGTH[severity] * w / 640)) | 1  # odd
        angle = rng.uniform(0, 180)
        kernel = np.zeros((length, length), np.float32)
        kernel[length // 2, :] = 1.0 / length
        rot = cv2.getRotationMatrix2D((length / 2 - 0.5, length / 2 - 0.5), angle, 1.0)
        kernel = cv2.warpAffine(kernel, rot, (length, length))
        kernel /= max(kernel.sum(), 1e-6)
        return cv2.filter2D(rgb, -1, kernel, borderType=cv2.BORDER_REFLECT)
    if name == "occlusion":
        out = rgb.copy()
        target, covered = _OCCLUDED[severity] * h * w, 0.0
        while covered < target:
            rh, rw = int(rng.integers(h // 10 + 1, h // 4 + 2)), int(rng.integers(w // 10 + 1, w // 4 + 2))
            y, x = int(rng.integers(0, h - rh + 1)), int(rng.integers(0, w - rw + 1))
            out[y : y + rh, x : x + rw] = int(rng.integers(60, 200))
            covered += rh * rw
        return out
    if name == "brightness":
        return np.clip(rgb.astype(np.float32) * _BRIGHTNESS[severity], 0, 255).astype(np.uint8)
    if name == "jpeg":
        ok, buf = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY[severity]])
        if not ok:
            raise ValueError("JPEG encoding failed")
        return np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1])
    raise ValueError(f"unknown corruption {name!r}; choose from {IMAGE_CORRUPTIONS}")


# Question rewrites that keep the meaning (tried in order; the first that matches applies).
_PARAPHRASES = [
    (r"^how many (.+?) are (.+)\?$", r"what is the number of \1 \2?"),
    (r"^how many (.+)\?$", r"count the \1: how many are there?"),
    (r"^is there (.+)\?$", r"can you see \1?"),
    (r"^are there (.+)\?$", r"can you see any \1?"),
    (r"^what color is (.+)\?$", r"which color does \1 have?"),
    (r"^what is (.+)\?$", r"tell me what \1 is?"),
    (r"^is (.+)\?$", r"would you say \1 is the case?"),
    (r"^which (.+)\?$", r"tell me which \1?"),
]
_DISTRACTORS = (
    "The conveyor belt is running. ",
    "Ignore the floor markings. ",
    "The camera is mounted on the robot arm. ",
    "There may be people walking by. ",
)


def perturb_question(question: str, name: str, seed: int) -> str:
    """``question`` rewritten by ``name`` (``paraphrase`` or ``distractor``), seeded."""
    q = question.strip()
    if name == "paraphrase":
        lower = q[0].lower() + q[1:] if q else q
        for pattern, repl in _PARAPHRASES:
            if re.match(pattern, lower):
                return re.sub(pattern, repl, lower)
        return f"please answer: {lower}"
    if name == "distractor":
        return _DISTRACTORS[int(np.random.default_rng(seed).integers(len(_DISTRACTORS)))] + q
    raise ValueError(f"unknown question perturbation {name!r}; choose from {QUESTION_PERTURBATIONS}")
