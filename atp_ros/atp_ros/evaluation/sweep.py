"""Running a sweep: every setting over every sample, one cached result file per setting.

A :class:`Setting` is one way of choosing tokens (the unpruned reference, ATP with a keep ratio,
alpha and normalization, or a baseline), optionally on perturbed inputs. :func:`run_setting`
answers every sample with it and returns one record per sample; :class:`Cache` keeps each
finished setting on disk keyed by everything that determines it, so a re-run with the same
arguments resumes where an interrupted one stopped. :func:`summarize` turns records into the
figures the report shows.
"""

from __future__ import annotations

import hashlib
import json
import math
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from atp_ros.backends import STAGES, VlmBackend
from atp_ros.backends.streaming import answer_on_stream
from atp_ros.evaluation import metrics
from atp_ros.evaluation.files import write_atomic
from atp_ros.evaluation.perturb import corrupt, perturb_question
from atp_ros.evaluation.sources import Sample
from atp_ros.method import KEEP_ALL, AtpConfig
from atp_ros.stream import ReuseConfig, StreamCache
from atp_ros.warehouse.scenes import evidence_mask

REFERENCE_LABEL = "full"  # its name in results and reports
CACHE_SCHEMA = 2  # bump when a record's fields change: older cache files are then recomputed


@dataclass(frozen=True)
class Setting:
    """One evaluated configuration. ``perturbation``: "" (clean), ``"image:<name>:<severity>"`` or
    ``"question:<name>"``."""

    selector: str  # a name of method.make_selector (KEEP_ALL: the unpruned reference every sweep includes)
    keep_ratio: float = 1.0
    alpha: float = 0.0
    normalization: str = "minmax"
    perturbation: str = ""
    mass: float = 0.0  # > 0: ATP's adaptive budget (tau) instead of keep_ratio
    reuse: str = "none"  # "answer"/"tokens": samples answered in order as one stream, like the node's reuse.mode

    @property
    def name(self) -> str:
        if self.selector == KEEP_ALL:
            base = REFERENCE_LABEL
        elif self.selector == "atp":
            budget = f"tau={self.mass:g}" if self.mass > 0 else f"k={self.keep_ratio:g}"
            base = f"atp a={self.alpha:g} {budget}" + (
                f" {self.normalization}" if self.normalization != "minmax" else ""
            )
        else:
            base = f"{self.selector} k={self.keep_ratio:g}"
        base += f" reuse={self.reuse}" if self.reuse != "none" else ""
        return base + (f" [{self.perturbation}]" if self.perturbation else "")

    def atp_config(self, base: AtpConfig) -> AtpConfig:
        """The backend settings: ``base`` (positions, read-out, signal, seed) with this selection."""
        if self.selector == KEEP_ALL:
            return base.keep_all()
        return replace(
            base,
            enabled=True,
            selector=self.selector,
            keep_ratio=self.keep_ratio,
            keep_tokens=0,
            mass=self.mass,
            alpha=self.alpha,
            normalization=self.normalization,
        )

    def node_params(self) -> dict:
        """The same selection as ``atp_vlm`` node parameters."""
        if self.selector == KEEP_ALL:
            return {"atp.enabled": False, "reuse.mode": self.reuse}
        return {
            "reuse.mode": self.reuse,
            "atp.enabled": True,
            "atp.selector": self.selector,
            "atp.keep_ratio": self.keep_ratio,
            "atp.keep_tokens": 0,
            "atp.mass": self.mass,
            "atp.alpha": self.alpha,
            "atp.normalization": self.normalization,
        }


def grid(
    keep_ratios: Sequence[float],
    alphas: Sequence[float],
    selectors: Sequence[str],
    norms: Sequence[str],
    masses: Sequence[float] = (),
) -> list[Setting]:
    """The reference first, then ATP over keep x alpha x normalization, each baseline over keep, and
    ATP's adaptive budget over tau x alpha."""
    out = [Setting(KEEP_ALL)]
    for keep in keep_ratios:
        if "atp" in selectors:
            out += [Setting("atp", keep, a, n) for a in alphas for n in norms]
        out += [Setting(s, keep, {"text_only": 1.0}.get(s, 0.0)) for s in selectors if s != "atp"]
    out += [Setting("atp", 1.0, a, n, mass=tau) for tau in masses for a in alphas for n in norms]
    return out


def perturbed(sample: Sample, perturbation: str) -> Sample:
    """``sample`` with its image or question perturbed; the seed comes from the sample's key."""
    if not perturbation:
        return sample
    seed = int(hashlib.sha256(sample.key.encode()).hexdigest()[:8], 16)
    kind, _, rest = perturbation.partition(":")
    if kind == "image":
        name, _, severity = rest.partition(":")
        return replace(sample, image=corrupt(sample.image, name, int(severity), seed))
    if kind == "question":
        return replace(sample, question=perturb_question(sample.question, rest, seed))
    raise ValueError(f"unknown perturbation {perturbation!r}")


def samples_digest(samples: Sequence[Sample]) -> str:
    """A short hash of the exact inputs (keys, questions, truth, image bytes)."""
    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s.key}\x00{s.question}\x00{s.answers}\x00{s.evidence}\x00{s.image.shape}".encode())
        h.update(hashlib.sha256(s.image.tobytes()).digest())
    return h.hexdigest()[:16]


class Cache:
    """One JSON file per finished setting under ``root``, keyed by model, inputs, options and setting."""

    def __init__(self, root: Path, context: dict) -> None:
        self.root = root
        # everything besides the setting that determines a result, and the record format
        self.context = {**context, "schema": CACHE_SCHEMA, "stages": list(STAGES)}
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, setting: Setting) -> Path:
        key = json.dumps({"context": self.context, "setting": asdict(setting)}, sort_keys=True)
        return self.root / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"

    def get(self, setting: Setting) -> dict | None:
        """``{"records": [...], "memory": {...}}`` of a finished setting, or None."""
        path = self._path(setting)
        if not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text())
            records = entry["records"]
            if any(set(STAGES) - set(r["ms"]) for r in records):  # written by an older version
                return None
            return {"records": records, "memory": entry.get("memory", {})}
        except (OSError, ValueError, KeyError, TypeError):  # a file cut short by a crash: recompute it
            return None

    def put(self, setting: Setting, entry: dict) -> None:
        write_atomic(self._path(setting), json.dumps({"setting": asdict(setting), **entry}))


def _evidence_keep(result, b: int, sample: Sample) -> float | None:
    """Evidence recall of image ``b``: evidence boxes mapped into the patch grid's view of the frame."""
    if not sample.evidence:
        return None
    view = result.views[b]
    boxes = [(x0 - view.x0, y0 - view.y0, x1 - view.x0, y1 - view.y0) for x0, y0, x1, y1 in sample.evidence]
    need = evidence_mask(boxes, (view.y1 - view.y0, view.x1 - view.x0), result.grid_of(b))
    return metrics.evidence_recall(result.keep_mask(b).astype(bool), need)


def run_setting(
    backend: VlmBackend,
    samples: Sequence[Sample],
    setting: Setting,
    base: AtpConfig,
    max_new_tokens: int,
    batch: int = 1,
    progress: Callable[[int], None] | None = None,
) -> list[dict]:
    """Answer every sample with ``setting``; one record per sample (answer, tokens, FLOPs, stage times).
    With answer reuse the samples are one stream, answered one by one in their order."""
    inputs = [perturbed(s, setting.perturbation) for s in samples]
    if setting.reuse != "none":
        reuse = ReuseConfig(mode=setting.reuse)
        return answer_stream(backend, inputs, setting.atp_config(base), max_new_tokens, reuse, progress)
    return answer_samples(backend, inputs, setting.atp_config(base), max_new_tokens, batch, progress)


def answer_stream(
    backend: VlmBackend,
    samples: Sequence[Sample],
    atp: AtpConfig,
    max_new_tokens: int,
    reuse: ReuseConfig,
    progress: Callable[[int], None] | None = None,
) -> list[dict]:
    """Answer ``samples`` in order as one camera stream with :class:`~atp_ros.stream.StreamCache` (stream
    time: the bag stamps, else 10 Hz); a reused sample's record is the full run's with its own key, accuracy
    and ``ms`` (only ``total``: the change check), and ``reused`` says which it was."""
    cache = StreamCache(reuse)
    records: list[dict] = []
    for i, s in enumerate(samples):
        now = s.stamp_ns / 1e9 if s.stamp_ns is not None else i / 10.0
        t = time.perf_counter()
        step = answer_on_stream(backend, cache, s.image, s.question, atp, max_new_tokens, now)
        if step.reuse is not None:
            last = _records(step.result, [s])[0]
            check = dict.fromkeys(STAGES, 0.0) | {"total": (time.perf_counter() - t) * 1e3}
            records.append({**last, "key": s.key, "question": s.question, "ms": check,
                            "evidence_recall": None, "reused": True})  # fmt: skip
        else:
            record = _records(step.result, [s])[0] | {"reused": False}
            if reuse.mode == "tokens":
                record["recomputed"] = step.recomputed  # patches the tower re-ran (None: all of them)
            records.append(record)
        if progress:
            progress(1)
    return records


def answer_samples(
    backend: VlmBackend,
    samples: Sequence[Sample],
    atp: AtpConfig,
    max_new_tokens: int,
    batch: int = 1,
    progress: Callable[[int], None] | None = None,
    reseed_random: bool = False,
) -> list[dict]:
    """Answer every sample with ``atp`` in batches of ``batch``; one record per sample (answer, its
    :func:`metrics.accuracy`, tokens, evidence recall, FLOPs, stage times). ``reseed_random``: the
    random selector draws each batch with the seed ``atp.seed`` + the batch's first index, so
    batches do not all keep the same patches."""
    records: list[dict] = []
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        cfg = replace(atp, seed=atp.seed + start) if reseed_random and atp.selector == "random" else atp
        result = backend.answer([s.image for s in chunk], [s.question for s in chunk], cfg, max_new_tokens)
        records += _records(result, chunk)
        if progress:
            progress(len(chunk))
    return records


def _records(result, chunk: Sequence[Sample]) -> list[dict]:
    """One record per sample of a batch answered in one call."""
    stages = result.timings.as_dict()
    per_image = {k: v / len(chunk) for k, v in stages.items()}  # a batch's time, shared out
    return [
        {
            "key": s.key,
            "question": s.question,
            "answer": result.answers[b],
            "accuracy": metrics.accuracy(result.answers[b], s.answers) if s.answers else None,
            "kept": int(result.visual_tokens_kept[b]),
            "total": int(result.visual_tokens_total[b]),
            "evidence_recall": _evidence_keep(result, b, s),
            "flops_prefill": float(result.flops["llm_prefill"]),
            "flops_pipeline": float(result.flops["pipeline"]),
            "ms": per_image,
            "notes": list(result.notes),
        }
        for b, s in enumerate(chunk)
    ]


def add_fidelity(records: list[dict], reference: list[dict]) -> None:
    """Fidelity of each record: agreement with the unpruned answer to the same (perturbed) input."""
    ref = {r["key"]: r["answer"] for r in reference}
    for r in records:
        r["fidelity"] = metrics.agrees(r["answer"], ref[r["key"]]) if r["key"] in ref else None


def memory_mb(device: torch.device) -> dict[str, float]:
    """Resident memory now and the process peak (CPU), or the CUDA peak since the last reset."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    try:
        with open("/proc/self/statm") as f:
            out["rss_mb"] = int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        pass
    if device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def summarize(records: list[dict], bootstrap: int = 1000, seed: int = 0) -> dict:
    """The figures of one setting: accuracy and fidelity with bootstrap CIs, evidence recall, tokens,
    FLOPs, per-stage latency percentiles."""

    def stat(name: str) -> dict:
        values = [r[name] for r in records if r.get(name) is not None]
        if not values:
            return {"mean": None, "ci": [None, None], "n": 0}
        lo, hi = metrics.bootstrap_ci(values, n=bootstrap, seed=seed)
        return {"mean": float(np.mean(values)), "ci": [lo, hi], "n": len(values)}

    kept = [r["kept"] for r in records]
    recall = [r["evidence_recall"] for r in records if r.get("evidence_recall") is not None]
    latency = {s: metrics.percentiles([r["ms"][s] for r in records]) for s in (*STAGES, "total")}
    reused = [bool(r["reused"]) for r in records if "reused" in r]
    return {
        "reuse_rate": float(np.mean(reused)) if reused else None,
        "n": len(records),
        "accuracy": stat("accuracy"),
        "fidelity": stat("fidelity"),
        "evidence_recall": float(np.mean(recall)) if recall else None,
        "tokens_kept": {
            "mean": float(np.mean(kept)),
            **{k: float(v) for k, v in zip(("p10", "p50", "p90"), np.percentile(kept, [10, 50, 90]), strict=True)},
            "total": records[0]["total"],
        },
        "flops_prefill": float(np.mean([r["flops_prefill"] for r in records])),
        "flops_pipeline": float(np.mean([r["flops_pipeline"] for r in records])),
        "latency_ms": latency,
    }


def quality(summary: dict) -> tuple[str, float | None]:
    """The metric a setting is judged by: accuracy where there is ground truth, else fidelity."""
    if summary["accuracy"]["mean"] is not None:
        return "accuracy", summary["accuracy"]["mean"]
    return "fidelity", summary["fidelity"]["mean"]


def recommend(rows: list[dict], tolerance: float) -> dict | None:
    """The cheapest pruned clean setting whose quality is within ``tolerance`` of the reference: fewest
    visual tokens kept (what sets the LLM's cost and KV cache), then the higher quality (measured on the
    same samples), then the lower p50 latency (measured setting after setting, so the noisiest of the
    three); None when no pruned setting is that close."""
    clean = [r for r in rows if not r["setting"]["perturbation"] and r["setting"].get("reuse", "none") == "none"]
    ref = next((r for r in clean if r["setting"]["selector"] == KEEP_ALL), None)
    if ref is None:
        return None
    _, ref_q = quality(ref["summary"])
    if ref_q is None:
        return None
    ok = []
    for r in clean:
        _, q = quality(r["summary"])
        if r is not ref and q is not None and q >= ref_q - tolerance:
            ok.append(r)
    if not ok:
        return None

    def cost(r: dict) -> tuple[float, float, float]:
        m = r["summary"]
        return m["tokens_kept"]["mean"], -quality(m)[1], m["latency_ms"]["total"]["p50"]

    return min(ok, key=cost)


def pareto(rows: list[dict]) -> list[dict]:
    """Clean settings not beaten on both quality (higher) and p50 latency (lower) by another."""
    pts = [(r, quality(r["summary"])[1], r["summary"]["latency_ms"]["total"]["p50"]) for r in rows]
    pts = [p for p in pts if p[1] is not None and not p[0]["setting"]["perturbation"] and math.isfinite(p[2])]
    front = []
    for r, q, t in pts:
        if not any((q2 >= q and t2 <= t) and (q2 > q or t2 < t) for _, q2, t2 in pts):
            front.append(r)
    return sorted(front, key=lambda r: r["summary"]["latency_ms"]["total"]["p50"])
