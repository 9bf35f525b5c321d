"""``evaluate``: how many visual tokens can we drop on our own recorded data, at what accuracy and latency?

    evaluate --bag BAG [--image-topic /camera/image_raw] [--query-topic /atp_vlm/query] [--truth FILE]
    evaluate --dataset DIR          (warehouse samples.jsonl, VQAv2-style or GQA-style JSON + images/)
        [--model warehouse-cell] [--keep-ratios 0.6,0.4,0.25,0.11] [--alphas 0.5] [--selectors atp,random,...]
        [--normalization minmax] [--reuse none,answer] [--corruptions all] [--question-perturbations all]
        [--live] --out DIR

Every setting runs over every sample (the unpruned model is always the reference); figures per
setting: accuracy (ground truth) and fidelity (agreement with the unpruned answer) with bootstrap
CIs, evidence recall, tokens kept, FLOPs, latency per stage, memory. Robustness reruns the
unpruned model and one ATP setting on corrupted images and rewritten questions. ``--live`` replays
the bag through the installed node over DDS and records what it publishes. Output: results.json,
results.csv, report.md and PNG plots in ``--out``; finished settings are cached there, so the same
command resumes after Ctrl-C. Exit status 0 when something was evaluated, 1 when nothing could be.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

from tqdm import tqdm

from atp_ros.evaluation.perturb import IMAGE_CORRUPTIONS, QUESTION_PERTURBATIONS, SEVERITIES
from atp_ros.evaluation.sources import SourceError
from atp_ros.evaluation.sweep import Setting
from atp_ros.method import KEEP_ALL, NORMALIZATIONS, PRUNING_SELECTORS, AtpConfig
from atp_ros.stream import REUSE_MODES

DEFAULT_IMAGE_TOPIC = "/camera/image_raw"
DEFAULT_QUERY_TOPIC = "/atp_vlm/query"


def _floats(lo: float, hi: float, lo_open: bool = True):
    def parse(text: str) -> list[float]:
        try:
            values = [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
        for v in values:
            if not ((lo < v if lo_open else lo <= v) and v <= hi):
                raise argparse.ArgumentTypeError(f"{v} is outside {'(' if lo_open else '['}{lo}, {hi}]")
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return values

    return parse


def _choices(allowed: tuple[str, ...], allow_none: bool = False):
    def parse(text: str) -> list[str]:
        if text == "all":
            return list(allowed)
        if allow_none and text in ("", "none"):
            return []
        values = [v.strip() for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one of {', '.join(allowed)}")
        bad = [v for v in values if v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; choose from {', '.join(allowed)} or all")
        return values

    return parse


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="evaluate", description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--bag", type=Path, help="rosbag2 (mcap or sqlite3) or ROS 1 bag")
    src.add_argument("--dataset", type=Path, help="folder with samples.jsonl, or VQAv2/GQA-style JSON + images/")
    ap.add_argument("--image-topic", default=DEFAULT_IMAGE_TOPIC, help="Image or CompressedImage topic")
    ap.add_argument("--query-topic", default=DEFAULT_QUERY_TOPIC, help="std_msgs/String questions")
    ap.add_argument(
        "--truth", type=Path, help="ground truth JSONL keyed by image stamp (default: BAG/ground_truth.jsonl)"
    )
    ap.add_argument("--model", default="warehouse-cell", help="anything load_backend accepts")
    ap.add_argument("--text-encoder", default="", help="joint-space text tower (default: the model's own rule)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--keep-ratios", type=_floats(0.0, 1.0), default=[0.6, 0.4, 0.25, 0.11])
    ap.add_argument("--alphas", type=_floats(0.0, 1.0, lo_open=False), default=[0.5])
    ap.add_argument("--masses", type=_floats(0.0, 1.0), default=[], help="ATP adaptive budgets (tau) to add")
    ap.add_argument(
        "--reuse",
        type=_choices(REUSE_MODES),
        default=["none"],
        help="reuse modes (none,answer,tokens): 'answer' and 'tokens' add each ATP keep ratio again, the samples "
        "answered in order as one stream reusing answers (and tower states) like the node's reuse.mode (an "
        "episode bag)",
    )
    ap.add_argument(
        "--selectors",
        type=_choices(PRUNING_SELECTORS),
        default=list(PRUNING_SELECTORS),
        help="atp and baselines, or all",
    )
    ap.add_argument("--normalization", type=_choices(NORMALIZATIONS), default=["minmax"])
    ap.add_argument(
        "--corruptions", type=_choices(IMAGE_CORRUPTIONS, True), default=[], help="image corruptions or all"
    )
    ap.add_argument("--severities", type=lambda t: [int(v) for v in t.split(",")], default=[1, 3])
    ap.add_argument("--question-perturbations", type=_choices(QUESTION_PERTURBATIONS, True), default=[], help="or all")
    ap.add_argument("--robust-keep", type=float, default=0.25, help="keep ratio of the ATP run under perturbations")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1, help="frames per call (1 = frame by frame, as the node runs)")
    ap.add_argument("--limit", type=int, default=0, help="evaluate at most this many samples (0 = all)")
    ap.add_argument("--tolerance", type=float, default=0.02, help="quality loss allowed for the recommendation")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--live", action="store_true", help="also replay the bag through the node over DDS")
    ap.add_argument("--rate", type=float, default=1.0, help="live replay speed (1 = recorded rate)")
    ap.add_argument("--live-frames", type=int, default=0, help="frames to replay live (0 = all)")
    ap.add_argument("--attach", default="", help="node name to attach to (e.g. /atp_vlm) instead of starting one")
    ap.add_argument("--out", type=Path, required=True)
    return ap


def _check(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1 or args.batch < 1 or args.limit < 0 or args.live_frames < 0:
        ap.error("--max-new-tokens and --batch must be >= 1; --limit and --live-frames >= 0")
    if not 0 < args.robust_keep <= 1 or not 0 <= args.tolerance <= 1 or args.bootstrap < 10:
        ap.error("--robust-keep in (0, 1], --tolerance in [0, 1], --bootstrap >= 10")
    if any(s not in SEVERITIES for s in args.severities):
        ap.error(f"--severities must be among {SEVERITIES}")
    if args.live and not args.bag:
        ap.error("--live replays a bag: give --bag")
    if not 0 < args.rate <= 100:
        ap.error("--rate must be in (0, 100]")
    if args.out.exists() and not args.out.is_dir():
        ap.error(f"--out {args.out} exists and is not a folder")


def robustness_settings(args: argparse.Namespace) -> tuple[Setting, list[Setting]]:
    """The ATP setting checked under perturbations, and every (reference, ATP) run on perturbed inputs."""
    atp = Setting("atp", args.robust_keep, args.alphas[0], args.normalization[0])
    perturbations = [f"image:{c}:{s}" for c in args.corruptions for s in args.severities]
    perturbations += [f"question:{q}" for q in args.question_perturbations]
    runs = []
    for p in perturbations:
        runs += [Setting(KEEP_ALL, perturbation=p), replace(atp, perturbation=p)]
    return atp, runs


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    _check(ap, args)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    command = "evaluate " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    try:
        return _evaluate(args, command, started)
    except KeyboardInterrupt:  # before anything finished (reading the input, loading the model)
        print("\nevaluate: interrupted before any setting finished; nothing written", file=sys.stderr)
        return 130


def _evaluate(args: argparse.Namespace, command: str, started: str) -> int:
    """Read, sweep, report; Ctrl-C from the sweep on still writes the report of what finished."""
    loaded = _load_samples(args)
    backend = _load_model(args) if loaded else None
    if backend is None:
        return 1
    base = AtpConfig(seed=args.seed)
    robust, settings = _settings(args)
    done, interrupted = _sweep(args, backend, loaded.samples, settings, base)
    if not done:
        print("evaluate: error: nothing was evaluated", file=sys.stderr)
        return 130 if interrupted else 1
    with _interrupt_held() as held:  # what finished is written whole, even when Ctrl-C comes meanwhile
        results = _results(args, loaded, backend, done, robust, interrupted)
        results["meta"] |= {"command": command, "date": started}  # keys already in place: the order stays
        args.out.mkdir(parents=True, exist_ok=True)
    if not (interrupted or held):
        try:
            _overlays(args.out, backend, loaded.samples, robust, base, args.max_new_tokens)
            if args.live:
                interrupted = _live(args, results, done, loaded.samples, robust)
        except KeyboardInterrupt:
            interrupted = True
            print("\nevaluate: interrupted: writing what has finished")
    with _interrupt_held() as held_too:
        _report(args.out, results)
    return 130 if interrupted or held or held_too else 0


@contextlib.contextmanager
def _interrupt_held() -> Iterator[list[int]]:
    """Ctrl-C (SIGINT) is held back inside the block; the yielded list is non-empty once one came.

    Outside the main thread signals cannot be handled here, and the block runs as it is.
    """
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return
    before = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    try:
        yield got
    finally:
        signal.signal(signal.SIGINT, before)
        if got:
            print("\nevaluate: interrupted: the report holds what had finished")


def _load_samples(args: argparse.Namespace):
    """The samples of ``--bag`` or ``--dataset`` (problems printed), or None after one error line."""
    from atp_ros.evaluation.sources import read_bag, read_dataset

    try:
        if args.bag:
            loaded = read_bag(args.bag, args.image_topic, args.query_topic, args.truth, args.limit)
        else:
            loaded = read_dataset(args.dataset, args.limit)
    except SourceError as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return None
    print(f"evaluate: {len(loaded.samples)} samples from {loaded.description}")
    for line in loaded.problems.lines():
        print(f"evaluate: input problem: {line}")
    return loaded


def _load_model(args: argparse.Namespace):
    """The backend ``--model`` names (notes printed), or None after one error line."""
    from atp_ros.backends import ModelLoadError, load_backend

    try:
        backend = load_backend(args.model, args.text_encoder, args.device, args.dtype)
    except ModelLoadError as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return None
    for note in backend.load_notes:
        print(f"evaluate: note: {note}")
    return backend


def _settings(args: argparse.Namespace) -> tuple[Setting, list[Setting]]:
    """The ATP setting of the robustness runs, and every setting to run: the grid, then the perturbed runs."""
    from atp_ros.evaluation.sweep import grid

    robust, robust_runs = robustness_settings(args)
    settings = grid(args.keep_ratios, args.alphas, args.selectors, args.normalization, args.masses)
    streamed = [s for s in settings if s.selector == "atp" and s.mass == 0]
    settings += [replace(s, reuse=mode) for mode in args.reuse if mode != "none" for s in streamed]
    if robust_runs and robust not in settings:
        settings.append(robust)  # its clean run is what the perturbed runs are compared with
    return robust, settings + robust_runs


def _sweep(args: argparse.Namespace, backend, samples: list, settings: list[Setting], base: AtpConfig):
    """Every setting over every sample, from the cache where it holds the setting: ``({setting: {"records",
    "memory"}}, interrupted)``; Ctrl-C stops after what has finished."""
    from atp_ros.evaluation.sweep import Cache, memory_mb, run_setting, samples_digest

    context = {
        "model": args.model,
        "text_encoder": args.text_encoder,
        "device": str(backend.device),
        "dtype": str(backend.dtype),
        "samples": samples_digest(samples),
        "max_new_tokens": args.max_new_tokens,
        "batch": args.batch,
        "base": asdict(base),
    }
    cache = Cache(args.out / "cache", context)
    done: dict[Setting, dict] = {}
    todo = [s for s in settings if cache.get(s) is None]
    print(f"evaluate: {len(settings)} settings ({len(settings) - len(todo)} cached) on {backend.device}")
    interrupted = False
    bar = tqdm(total=len(todo) * len(samples), desc="frames", unit="frame", dynamic_ncols=True)
    try:
        for setting in settings:
            entry = cache.get(setting)
            if entry is None:
                bar.set_postfix_str(setting.name)
                if backend.device.type == "cuda":
                    import torch

                    torch.cuda.reset_peak_memory_stats(backend.device)
                records = run_setting(
                    backend, samples, setting, base, args.max_new_tokens, args.batch, progress=bar.update
                )
                entry = {"records": records, "memory": memory_mb(backend.device)}
                cache.put(setting, entry)
            done[setting] = entry
    except KeyboardInterrupt:
        interrupted = True
        print("\nevaluate: interrupted: writing what has finished (re-run the same command to resume)")
    finally:
        bar.close()
    return done, interrupted


def _results(args: argparse.Namespace, loaded, backend, done: dict, robust: Setting, interrupted: bool) -> dict:
    """``results.json``'s content: one summarized row per setting (fidelity against the unpruned run on
    the same input), the recommendation, the Pareto front and the robustness table."""
    from atp_ros.evaluation import report
    from atp_ros.evaluation.sweep import add_fidelity, pareto, quality, recommend, summarize

    rows = []
    for setting, entry in done.items():
        reference = done.get(Setting(KEEP_ALL, perturbation=setting.perturbation))
        if reference is not None:
            add_fidelity(entry["records"], reference["records"])
        summary = summarize(entry["records"], args.bootstrap, args.seed)
        rows.append({"name": setting.name, "setting": asdict(setting), "summary": summary, "memory": entry["memory"]})
    metric = "accuracy" if any(r["summary"]["accuracy"]["mean"] is not None for r in rows) else "fidelity"
    ref_row = next((r for r in rows if r["name"] == Setting(KEEP_ALL).name), None)
    return {
        "meta": {
            "model": args.model,
            "source": loaded.description,
            "samples": len(loaded.samples),
            "input_problems": loaded.problems.lines(),
            "command": "",  # filled in by main
            "machine": report.machine(),
            "date": "",  # filled in by main
            "tolerance": args.tolerance,
            "load_notes": backend.load_notes,
        },
        "complete": not interrupted,
        "metric": metric,
        "reference_quality": quality(ref_row["summary"])[1] if ref_row else None,
        "settings": rows,
        "recommended": recommend(rows, args.tolerance),
        "pareto": [
            {
                "name": r["name"],
                "quality": quality(r["summary"])[1],
                "latency_p50_ms": r["summary"]["latency_ms"]["total"]["p50"],
            }
            for r in pareto(rows)
        ],
        "robust_setting": robust.name,
        "robustness": _robustness(rows, robust),
    }


def _live(args: argparse.Namespace, results: dict, done: dict, samples: list, robust: Setting) -> bool:
    """Replay the bag through the node with the recommended setting (else ``robust``) into
    ``results["live"]``; True when interrupted. A failure is one line and the offline report stands."""
    from atp_ros.evaluation import live, report

    rec = results["recommended"]
    live_setting = Setting(**rec["setting"]) if rec else robust
    report.write(args.out, results)  # the offline report stands even if the live part fails
    try:
        results["live"] = live.replay(args, live_setting, done, samples)
    except KeyboardInterrupt:
        results["live"] = {"error": "interrupted"}
        return True
    except Exception as err:  # no ROS, node would not start, DDS trouble: one line, report kept
        message = err if isinstance(err, live.LiveError) else f"{type(err).__name__}: {err}"
        print(f"evaluate: live replay failed: {message}", file=sys.stderr)
        results["live"] = {"error": str(message)}
    return False


def _report(out: Path, results: dict) -> None:
    """Write the report files and print the recommendation."""
    from atp_ros.evaluation import report

    report.write(out, results)
    print(f"evaluate: wrote {out / 'report.md'}, results.json, results.csv and plots")
    rec, metric = results["recommended"], results["metric"]
    if rec:
        m = rec["summary"]
        print(
            f"evaluate: recommended {rec['name']}: {metric} {m[metric]['mean']:.3f} "
            f"(unpruned {results['reference_quality']:.3f}), {m['tokens_kept']['mean']:.1f}/"
            f"{m['tokens_kept']['total']} tokens, p50 {m['latency_ms']['total']['p50']:.1f} ms"
        )


def _robustness(rows: list[dict], robust: Setting) -> list[dict]:
    """Per perturbation: accuracy and fidelity of the reference and the ATP setting, and their change vs clean."""
    by = {(r["setting"]["selector"], r["setting"]["perturbation"]): r for r in rows}
    clean_ref, clean_atp = by.get((KEEP_ALL, "")), next((r for r in rows if r["name"] == robust.name), None)
    out = []
    for (selector, perturbation), row in sorted(by.items(), key=lambda kv: kv[0][1]):
        if selector != KEEP_ALL or not perturbation:
            continue
        atp_row = next((r for r in rows if r["name"] == replace(robust, perturbation=perturbation).name), None)
        entry = {"perturbation": perturbation}
        for label, pert, clean in (("full", row, clean_ref), ("atp", atp_row, clean_atp)):
            vals = {}
            for metric in ("accuracy", "fidelity"):
                now = pert["summary"][metric]["mean"] if pert else None
                was = clean["summary"][metric]["mean"] if clean else None
                vals[metric] = now
                vals[f"{metric}_delta"] = None if now is None or was is None else now - was
            entry[label] = vals
        out.append(entry)
    return out


def _overlays(out: Path, backend, samples, setting: Setting, base: AtpConfig, max_new_tokens: int) -> None:
    """The keep masks of ``setting`` (the ATP setting of the robustness runs) on six samples, as a
    Figure-3 style grid (overlays.png)."""
    from atp_ros.evaluation import report
    from atp_ros.ros import overlay

    shots = []
    step = max(1, len(samples) // 6)
    for s in samples[::step][:6]:
        res = backend.answer([s.image], [s.question], setting.atp_config(base), max_new_tokens)
        img = overlay.overlay(s.image, res.keep_mask(0), res.views[0])
        shots.append((img, s.question, res.answers[0], s.answers[0] if s.answers else ""))
    report.overlay_grid(out, shots, f"kept patches in color, pruned grayed: {setting.name}")


if __name__ == "__main__":
    sys.exit(main())
