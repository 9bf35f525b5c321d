"""The node's parameters: one table with defaults, ranges, descriptions and checks.

No ROS imports: the node turns each :class:`Param` into a ``ParameterDescriptor``;
tests and the launch file read the same table. ``RUNTIME`` parameters (``atp.*``,
``processing.*``, ``reuse.*``) may change while the node runs; the others are read-only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from atp_ros.method import INTER_READOUTS, INTRA_SIGNALS, NORMALIZATIONS, POSITION_MODES, SELECTORS, AtpConfig
from atp_ros.ros.worker import RuntimeConfig
from atp_ros.stream import REUSE_MODES, TOKEN_VARIANTS, ReuseConfig


@dataclass(frozen=True)
class Param:
    name: str
    default: Any
    description: str
    low: float | None = None  # inclusive range for numbers (descriptor range)
    high: float | None = None
    choices: tuple[str, ...] = ()
    runtime: bool = False  # may change while the node runs


PARAMS: tuple[Param, ...] = (
    Param(
        "autostart",
        True,
        "configure and activate by itself (false: wait in 'unconfigured' for a lifecycle manager)",
    ),
    Param(
        "cameras",
        (),
        "names of the cameras served with one model: inputs <name>/image and ~/<name>/query, outputs "
        "~/<name>/answer, ...; unset = one camera on 'image' with outputs ~/answer, ...",
    ),
    Param(
        "backend",
        "local",
        "local: load the model in this process; ray: send inference to an atp-serve deployment",
        choices=("local", "ray"),
    ),
    Param("ray.address", "auto", "Ray cluster address for backend ray (auto, ray://host:10001, host:6379)"),
    Param("ray.app", "atp_vlm", "Ray Serve application name of the atp-serve deployment"),
    Param("ray.timeout_s", 10.0, "a Ray request slower than this counts as the service being down", 0.1, 3600.0),
    Param(
        "model_id",
        "warehouse-cell",
        "VLM checkpoint: warehouse-cell or warehouse-tiny (bundled), hub id or local directory (families: README)",
    ),
    Param("text_encoder_id", "", "CLIP/SigLIP text tower for S_inter; empty = derived from the model"),
    Param("device", "auto", "auto (CUDA if present, else CPU), cpu, cuda, cuda:N"),
    Param("dtype", "auto", "auto (fp16/bf16 on CUDA, fp32 on CPU), float32, float16, bfloat16"),
    Param("max_new_tokens", 32, "answer length limit in tokens", 1, 1024),
    Param(
        "image_transport",
        "raw",
        "raw: subscribe to 'image'; compressed: to 'image/compressed'",
        choices=("raw", "compressed"),
    ),
    Param("atp.enabled", True, "prune visual tokens with ATP (false = feed all tokens)", runtime=True),
    Param(
        "atp.alpha",
        0.5,
        "weight of text relevance vs CLS saliency: S = a*N(S_inter) + (1-a)*N(S_intra)",
        0.0,
        1.0,
        runtime=True,
    ),
    Param(
        "atp.keep_ratio",
        0.25,
        "fraction of visual tokens kept, K = ceil(r*N); used when keep_tokens is 0",
        0.001,  # 0 would keep nothing: the descriptor's range is exactly what the check accepts
        1.0,
        runtime=True,
    ),
    Param("atp.keep_tokens", 0, "number of visual tokens kept (0 = use keep_ratio)", 0, 100000, runtime=True),
    Param(
        "atp.mass",
        0.0,
        "adaptive budget: keep the fewest tokens holding this share of score mass (0 = off)",
        0.0,
        1.0,
        runtime=True,
    ),
    Param(
        "atp.intra_signal",
        "cls",
        "S_intra: cls (CLS attention) or received (mean attention received)",
        choices=INTRA_SIGNALS,
        runtime=True,
    ),
    Param(
        "atp.normalization",
        "minmax",
        "per-image score normalization before fusion",
        choices=NORMALIZATIONS,
        runtime=True,
    ),
    Param(
        "atp.selector",
        "atp",
        "token selector: atp (the paper) or a baseline for comparisons (cls_only, text_only, random, uniform, "
        "divprune, keep_all)",
        choices=tuple(SELECTORS),
        runtime=True,
    ),
    Param(
        "atp.positions",
        AtpConfig.positions,
        "LLM position ids of kept visual tokens: original (as among all N) or compact (renumbered 0..K)",
        choices=POSITION_MODES,
        runtime=True,
    ),
    Param(
        "atp.inter_readout",
        AtpConfig.inter_readout,
        "how patches reach the joint space for S_inter: naive (post-layernorm + projection), "
        "maskclip (last layer's value path), clearclip (query-query attention, no residual/MLP)",
        choices=INTER_READOUTS,
        runtime=True,
    ),
    Param(
        "processing.max_rate_hz",
        0.0,
        "upper bound on inferences per second (0 = as fast as frames allow)",
        0.0,
        1000.0,
        runtime=True,
    ),
    Param(
        "reuse.mode",
        "none",
        "none: every frame runs the model; answer: a frame whose question and watched patches (ATP's kept set "
        "of the last full run, plus reuse.margin) did not change gets that run's answer, marked reused; tokens: "
        "answer reuse, and a frame that runs the model re-runs the vision tower only on the patches that changed "
        "(llava family; others run the whole tower)",
        choices=REUSE_MODES,
        runtime=True,
    ),
    Param(
        "reuse.variant",
        ReuseConfig.variant,
        "token reuse: eventful (re-run patches attend to every patch's cached states) or drop (only to each other)",
        choices=TOKEN_VARIANTS,
        runtime=True,
    ),
    Param(
        "reuse.threshold",
        ReuseConfig.threshold,
        "gray levels (0-255, plus 8% of the level) a cell of a watched patch may move before it counts as changed",
        0.5,
        255.0,
        runtime=True,
    ),
    Param("reuse.margin", ReuseConfig.margin, "patches around the kept set that are watched too", 0, 64, runtime=True),
    Param(
        "reuse.refresh_frames",
        ReuseConfig.refresh_frames,
        "a full run at least every this many frames of a camera",
        1,
        100000,
        runtime=True,
    ),
    Param(
        "reuse.refresh_s",
        ReuseConfig.refresh_s,
        "a full run at least every this many seconds",
        0.01,
        3600.0,
        runtime=True,
    ),
    Param("limits.max_image_pixels", 4096 * 4096, "frames with more pixels are rejected", 1, 1 << 30),
    Param("limits.max_query_chars", 512, "longer questions are rejected", 1, 100000),
    Param(
        "limits.ask_timeout_s",
        60.0,
        "an ask (~/ask_sync, ~/ask) not answered within this many seconds is cancelled and fails",
        0.1,
        86400.0,
    ),
    Param("diagnostics.window", 100, "frames in the p50/p95 latency window", 1, 100000),
)
BY_NAME: dict[str, Param] = {p.name: p for p in PARAMS}


def check(name: str, value: Any) -> str | None:
    """Reason ``value`` is invalid for parameter ``name``, or None when it is fine."""
    spec = BY_NAME.get(name)
    if spec is None:
        return None  # not ours (use_sim_time, qos overrides, ...)
    if isinstance(spec.default, bool):
        return None if isinstance(value, bool) else f"{name} must be a bool"
    if isinstance(spec.default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{name} must be a number"
        if isinstance(spec.default, int) and not isinstance(value, int):
            return f"{name} must be an integer"
        if spec.low is not None and value < spec.low:
            return f"{name}={value} is outside [{spec.low}, {spec.high}]"
        if spec.high is not None and value > spec.high:
            return f"{name}={value} is outside [{spec.low}, {spec.high}]"
        return None
    if isinstance(spec.default, tuple):
        names = list(value or [])
        if not all(isinstance(n, str) and n.replace("_", "").isalnum() and not n[0].isdigit() for n in names):
            return f"{name} must be ROS name tokens (letters, digits, _; not starting with a digit), got {names}"
        return None if len(set(names)) == len(names) else f"{name} has duplicates: {names}"
    if spec.choices and value not in spec.choices:
        return f"{name}={value!r} must be one of {', '.join(spec.choices)}"
    return None


def atp_config(values: dict[str, Any]) -> AtpConfig:
    """The :class:`AtpConfig` of a parameter snapshot ``{name: value}``."""
    return AtpConfig(
        enabled=bool(values["atp.enabled"]),
        alpha=float(values["atp.alpha"]),
        keep_ratio=float(values["atp.keep_ratio"]),
        keep_tokens=int(values["atp.keep_tokens"]),
        mass=float(values["atp.mass"]),
        intra_signal=str(values["atp.intra_signal"]),
        normalization=str(values["atp.normalization"]),
        selector=str(values["atp.selector"]),
        positions=str(values["atp.positions"]),
        inter_readout=str(values["atp.inter_readout"]),
    )


def runtime_config(values: dict[str, Any]) -> RuntimeConfig:
    """The worker's :class:`RuntimeConfig` of a parameter snapshot ``{name: value}``."""
    reuse = ReuseConfig(
        mode=str(values["reuse.mode"]),
        threshold=float(values["reuse.threshold"]),
        margin=int(values["reuse.margin"]),
        refresh_frames=int(values["reuse.refresh_frames"]),
        refresh_s=float(values["reuse.refresh_s"]),
        variant=str(values["reuse.variant"]),
    )
    return RuntimeConfig(atp=atp_config(values), max_rate_hz=float(values["processing.max_rate_hz"]), reuse=reuse)
