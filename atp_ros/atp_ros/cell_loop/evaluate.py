"""Closed-loop evaluation: seeded pick tasks through simulator, perception node and planner, per pruning setting.

``python -m atp_ros.cell_loop.evaluate --model DIR --tasks 50 --settings full atp_0.4 atp_0.25 atp_0.11
uniform_0.25 random_0.25 --out out/cell_eval`` starts ``cell_sim`` and ``vlm_node`` (one process each, in a
namespace of their own), runs the pick planner in this process, and for each setting (set on the running node
through its run-time parameters) and each seed: resets the cell to the seed, picks a task ("bring the <color>
<kind> to the conveyor" for an item a `where` question can name), runs it and scores it with the simulator's
ground truth. Writes ``report.json``, ``report.md`` (task success with Wilson 95% intervals, failure causes,
perception accuracy on the task's two questions, latencies) and ``success.png``; ``--frames`` also saves a frame
strip and an animated GIF per task (``make cell-demo``).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# (setting name) -> the perception node's run-time parameters
SETTINGS: dict[str, dict[str, Any]] = {
    "full": {"atp.enabled": False},
    "atp_0.4": {"atp.enabled": True, "atp.selector": "atp", "atp.keep_ratio": 0.4},
    "atp_0.25": {"atp.enabled": True, "atp.selector": "atp", "atp.keep_ratio": 0.25},
    "atp_0.11": {"atp.enabled": True, "atp.selector": "atp", "atp.keep_ratio": 0.11},
    "uniform_0.25": {"atp.enabled": True, "atp.selector": "uniform", "atp.keep_ratio": 0.25},
    "random_0.25": {"atp.enabled": True, "atp.selector": "random", "atp.keep_ratio": 0.25},
}
DEFAULT_SETTINGS = tuple(SETTINGS)
# Why a task failed, as the evaluation names it (ground truth decides between the first two).
EVAL_CAUSES = (
    "wrong_answer",  # the slot the planner acted on (from the answer, or the relevant box) was another, or none
    "wrong_box_grasped",  # the gripper closed on another item
    "wrong_confirmation",  # the right item was held but the node said otherwise, so the planner gave up
    "ik_failure",
    "timeout",
    "no_answer",
    "other",
)


@dataclass
class Scored:
    """One task's outcome: the planner's report plus what the ground truth says."""

    setting: str
    seed: int
    task: str
    success: bool
    cause: str | None
    where_correct: bool
    holding_correct: bool | None
    report: dict
    contrast: bool = False  # the item's color is shared by an item of the other kind on the racking


def choose_task(frame_truth: dict, seed: int) -> tuple[str, dict] | None:
    """A task about an item a `where` question can name in this frame (unique color and kind, visible), chosen by
    ``seed``; (task text, that object's truth) or None when the frame has none. The truth's ``contrast`` says
    whether an item of the other kind (a tote for a box) has the same color on the racking."""
    from atp_ros.cell_loop.picking import Task
    from atp_ros.warehouse.cell.questions import candidates, is_contrast
    from atp_ros.warehouse.cell.truth import CellTruth

    truth = CellTruth.from_json(frame_truth)
    pool = sorted(candidates(truth, "where"), key=lambda c: (c[0]["color"], c[0]["object_kind"]))
    if not pool:
        return None
    slots, answer, _ = pool[int(np.random.default_rng(seed).integers(len(pool)))]
    obj = next(o for o in truth.objects if (o.color, o.kind) == (slots["color"], slots["object_kind"]))
    target = {"id": obj.id, "where": answer, "color": obj.color, "contrast": is_contrast(truth, "where", slots)}
    return Task(slots["color"], slots["object_kind"]).text(), target


def score(setting: str, seed: int, task: str, target: dict, report: dict, grasped: list[int]) -> Scored:
    """Ground truth against the planner's report: success means the target lies on the conveyor."""
    from atp_ros.cell_loop.picking import parse_holding

    success = bool(report.get("delivered"))
    where_correct = report.get("answer_slot") == target["where"]
    holding = report.get("confirm_answer")
    holding_correct = None
    if holding is not None:
        expected = target["color"] if grasped and grasped[0] == target["id"] else ("nothing" if not grasped else None)
        holding_correct = None if expected is None else parse_holding(holding) == expected
    cause = None
    if not success:
        planner = report.get("cause")
        if planner in ("no_answer", "timeout", "ik_failure"):
            cause = planner
        elif report.get("target") != target["where"]:  # the slot acted on (the answer's or the evidence's), or none
            cause = "wrong_answer"
        elif grasped and grasped[0] != target["id"]:
            cause = "wrong_box_grasped"
        elif planner in ("grasp_not_confirmed", "wrong_box_grasped") and grasped and grasped[0] == target["id"]:
            cause = "wrong_confirmation"
        else:
            cause = "other"
    contrast = bool(target.get("contrast", False))
    return Scored(setting, seed, task, success, cause, where_correct, holding_correct, report, contrast)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a success rate (k of n)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(a: dict[int, bool], b: dict[int, bool], draws: int = 4000) -> dict | None:
    """Success of ``b`` minus ``a`` on the seeds both ran (the same tasks): the difference in points and a paired
    bootstrap 95% interval over seeds (seeded, so a report is reproducible); None without common seeds."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diff = np.array([float(b[s]) - float(a[s]) for s in seeds])
    rng = np.random.default_rng(0)
    means = diff[rng.integers(0, len(diff), (draws, len(diff)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"points": round(100 * diff.mean(), 1), "ci95": [round(100 * lo, 1), round(100 * hi, 1)], "n": len(seeds)}


def summarize(results: list[Scored], settings: list[str]) -> dict:
    """Per setting: success rate and interval, the paired difference to the first setting (the same seeds),
    causes, perception accuracy, latency and task time medians."""
    out = {}
    per_seed = {s: {r.seed: r.success for r in results if r.setting == s} for s in settings}
    for s in settings:
        rows = [r for r in results if r.setting == s]
        n, k = len(rows), sum(r.success for r in rows)
        held = [r.holding_correct for r in rows if r.holding_correct is not None]
        twin = [r for r in rows if r.contrast]

        def median(key: str, rows=rows) -> float | None:
            values = [r.report["timings"][key] for r in rows if key in r.report.get("timings", {})]
            return round(statistics.median(values), 3) if values else None

        out[s] = {
            "tasks": n,
            "success": k,
            "success_rate": round(k / n, 3) if n else None,
            "success_ci95": [round(v, 3) for v in wilson(k, n)],
            "vs_first": paired_difference(per_seed[settings[0]], per_seed[s]) if s != settings[0] else None,
            "causes": {c: sum(r.cause == c for r in rows) for c in EVAL_CAUSES if any(r.cause == c for r in rows)},
            "where_accuracy": round(sum(r.where_correct for r in rows) / n, 3) if n else None,
            "where_accuracy_contrast": round(sum(r.where_correct for r in twin) / len(twin), 3) if twin else None,
            "where_accuracy_otherwise": (
                round(sum(r.where_correct for r in rows if not r.contrast) / (n - len(twin)), 3)
                if n > len(twin)
                else None
            ),
            "contrast_tasks": len(twin),
            "holding_accuracy": round(sum(held) / len(held), 3) if held else None,
            "holding_asked": len(held),
            "ask_s_p50": median("ask_s"),
            "inference_ms_p50": median("inference_ms"),
            "confirm_s_p50": median("confirm_s"),
            "task_s_p50": median("total_s"),
            "tokens_kept": rows[0].report.get("tokens") if rows and rows[0].report.get("tokens") else None,
        }
    return out


def markdown(summary: dict, meta: dict) -> str:
    lines = [
        f"# Closed-loop pick tasks: {meta['model']}",
        "",
        f"{meta['tasks']} seeded tasks per setting (seeds {meta['seeds']}), camera {meta['camera']}, sim time scale "
        f"{meta['time_scale']}, on {meta['machine']}. Success = the named item lies on the conveyor (ground truth)"
        + ("." if meta.get("grasp_confirmation", True) else "; grasp confirmation off (--no-confirm).")
        + (" Interrupted: the table covers the tasks done before the stop." if meta.get("interrupted") else ""),
        "",
        "| setting | tokens kept | task success (95% CI) | vs first setting, points (paired 95% CI) "
        "| failure causes | `where` accuracy | `holding` accuracy | ask p50 s | inference p50 ms | task p50 s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s, v in summary.items():
        lo, hi = v["success_ci95"]
        causes = ", ".join(f"{c} {k}" for c, k in v["causes"].items()) or "-"
        tokens = f"{v['tokens_kept'][0]} of {v['tokens_kept'][1]}" if v["tokens_kept"] else "-"
        rate = f"{v['success']}/{v['tasks']} ({lo:.2f}-{hi:.2f})"
        held = f"{v['holding_accuracy']} (n={v['holding_asked']})" if v["holding_asked"] else "-"
        d = v.get("vs_first")
        delta = f"{d['points']:+.1f} ({d['ci95'][0]:+.1f} to {d['ci95'][1]:+.1f})" if d else "-"
        lines.append(
            f"| {s} | {tokens} | {rate} | {delta} | {causes} | {v['where_accuracy']} | {held} | {v['ask_s_p50']} "
            f"| {v['inference_ms_p50']} | {v['task_s_p50']} |"
        )
    first = next(iter(summary.values()), None)
    if first and first.get("contrast_tasks"):
        lines += [
            "",
            f"`where` accuracy on the {first['contrast_tasks']} tasks whose item's color an item of the other kind "
            "shares on the racking (a red tote for the red box), and on the others: "
            + "; ".join(
                f"{s} {v['where_accuracy_contrast']} and {v['where_accuracy_otherwise']}" for s, v in summary.items()
            )
            + ".",
        ]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    rates = [summary[s]["success_rate"] or 0.0 for s in names]
    err = np.array(
        [
            [r - summary[s]["success_ci95"][0], summary[s]["success_ci95"][1] - r]
            for s, r in zip(names, rates, strict=True)
        ]
    ).T
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.bar(names, rates, yerr=err, capsize=4, color="tab:blue")
    a.set_ylim(0, 1.05)
    a.set_ylabel("task success")
    a.tick_params(axis="x", rotation=30)
    lat = [summary[s]["ask_s_p50"] or 0.0 for s in names]
    tot = [summary[s]["task_s_p50"] or 0.0 for s in names]
    x = np.arange(len(names))
    b.bar(x - 0.2, lat, 0.4, label="perception (ask) p50")
    b.bar(x + 0.2, tot, 0.4, label="task end to end p50")
    b.set_xticks(x, names, rotation=30)
    b.set_ylabel("seconds")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class Loop:
    """This process's side: the planner node, and a client that resets the cell, reads its truth and events,
    sets the perception node's parameters and keeps camera frames for strips. One rclpy context of its own."""

    def __init__(self, namespace: str, planner_params: dict) -> None:
        import rclpy
        from rcl_interfaces.srv import SetParameters
        from rclpy.executors import MultiThreadedExecutor
        from sensor_msgs.msg import Image
        from std_msgs.msg import String

        from atp_ros.cell_loop.planner_node import PickPlanner
        from atp_ros.cell_loop.sim_node import LATCHED
        from atp_ros.ros import process

        process.use_dds_profile()
        self.context = rclpy.context.Context()
        rclpy.init(context=self.context)
        self.planner = PickPlanner(context=self.context, namespace=namespace, **planner_params)
        self.node = rclpy.create_node("cell_eval", namespace=namespace, context=self.context)
        self.lock = threading.Lock()
        self.truth: dict | None = None
        self.events: list[dict] = []
        self.frames: list[tuple[float, np.ndarray]] = []
        self.keep_frames = False
        self.image_stamps: collections.deque = collections.deque(maxlen=20)
        self.node.create_subscription(String, "cell_sim/truth", self._on_truth, LATCHED)
        self.node.create_subscription(String, "cell_sim/events", self._on_event, 50)
        from rclpy.qos import qos_profile_sensor_data

        self.node.create_subscription(Image, "camera/image_raw", self._on_image, qos_profile_sensor_data)
        self.sim_params = self.node.create_client(SetParameters, "cell_sim/set_parameters")
        self.vlm_params = self.node.create_client(SetParameters, "atp_vlm/set_parameters")
        self.executor = MultiThreadedExecutor(num_threads=3, context=self.context)
        self.executor.add_node(self.planner)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def _on_truth(self, msg) -> None:
        with self.lock:
            self.truth = json.loads(msg.data)

    def _on_event(self, msg) -> None:
        with self.lock:
            self.events.append(json.loads(msg.data))

    def _on_image(self, msg) -> None:
        with self.lock:
            self.image_stamps.append(msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9)
        if self.keep_frames:
            rgb = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.width, 3)
            with self.lock:
                self.frames.append((time.monotonic(), rgb))

    @staticmethod
    def wait(predicate, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")

    def set_params(self, client, values: dict[str, Any], what: str) -> None:
        """Set parameters over the node's service; RuntimeError with the node's reason when refused."""
        from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
        from rcl_interfaces.srv import SetParameters

        params = []
        for name, v in values.items():
            if isinstance(v, bool):
                pv = ParameterValue(type=ParameterType.PARAMETER_BOOL, bool_value=v)
            elif isinstance(v, int):
                pv = ParameterValue(type=ParameterType.PARAMETER_INTEGER, integer_value=v)
            elif isinstance(v, float):
                pv = ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=v)
            else:
                pv = ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=str(v))
            params.append(Parameter(name=name, value=pv))
        self.wait(lambda: client.service_is_ready(), 300, f"{what} parameter service")
        future = client.call_async(SetParameters.Request(parameters=params))
        self.wait(future.done, 30, f"{what} parameters")
        refused = [r.reason for r in future.result().results if not r.successful]
        if refused:
            raise RuntimeError(f"{what} refused {values}: {refused}")

    def reset(self, seed: int, settle_s: float) -> dict:
        """The cell at ``seed``; returns its first truth after the reset (camera frames of the new scene follow)."""
        with self.lock:
            self.truth, self.events = None, []
        self.set_params(self.sim_params, {"seed": seed}, "cell_sim")
        truth = self.wait(
            lambda: self.truth if self.truth and self.truth["state"]["seed"] == seed else None, 60, f"seed {seed}"
        )
        # The node's latest frame must show the new scene before the planner asks about it: two camera frames
        # taken after the reset (the truth is published on the reset's tick, before the next render) and a margin.
        self.wait(
            lambda: sum(s > truth["stamp"] for s in list(self.image_stamps)) >= 2, 60, "camera frames of the new scene"
        )
        time.sleep(settle_s)
        return truth

    def close(self) -> None:
        import rclpy

        self.planner.stop()
        self.executor.shutdown()
        self.thread.join(5)
        self.planner.destroy_node()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


def frame_strip(frames: list[np.ndarray], caption: list[str], path: Path, count: int = 6) -> None:
    """``count`` frames evenly spread over a task side by side, with caption lines below."""
    import cv2

    if not frames:
        return
    picks = [frames[round(i)] for i in np.linspace(0, len(frames) - 1, min(count, len(frames)))]
    strip = np.concatenate(picks, axis=1)
    h = 18 * len(caption) + 8
    band = np.full((h, strip.shape[1], 3), 255, np.uint8)
    for i, line in enumerate(caption):
        cv2.putText(band, line, (6, 18 * (i + 1)), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.imwrite(str(path), cv2.cvtColor(np.concatenate([strip, band]), cv2.COLOR_RGB2BGR))


def task_clip(frames: list[np.ndarray], path: Path, fps: float, max_frames: int = 150) -> None:
    """Every camera frame of a task (at most ``max_frames``, evenly thinned) as an animated GIF at ``fps``."""
    from PIL import Image as PilImage

    if not frames:
        return
    picks = [frames[round(i)] for i in np.linspace(0, len(frames) - 1, min(max_frames, len(frames)))]
    images = [PilImage.fromarray(f) for f in picks]
    duration = round(1000 / fps * len(frames) / len(picks))  # ms per shown frame: the task's own pace
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration, loop=0)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def interrupt_on_signals() -> None:
    """SIGTERM, and SIGINT even where a background shell started this process ignoring it, end the run as Ctrl-C
    does: the children are stopped and the report keeps the tasks done. Called again after rclpy's init, whose
    own handlers would only shut its context down and leave the children running."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m atp_ros.cell_loop.evaluate", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", default="warehouse-cell", help="the perception node's model_id (bundled name or directory)"
    )
    ap.add_argument("--tasks", type=int, default=50, help="seeded tasks per setting")
    ap.add_argument("--seed", type=int, default=1000, help="first seed (seeds seed .. seed+tasks-1 in every setting)")
    ap.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--out", default="out/cell_eval")
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--camera-rate", type=float, default=5.0)
    ap.add_argument("--time-scale", type=float, default=4.0, help="simulated seconds per wall second")
    ap.add_argument("--max-new-tokens", type=int, default=4)
    ap.add_argument("--frames", action="store_true", help="save a frame strip per task (frames/)")
    ap.add_argument(
        "--target-from",
        default="answer",
        choices=("answer", "relevant_box"),
        help="the planner's target: the slot the answer names, or the relevant box back-projected with depth",
    )
    ap.add_argument(
        "--no-confirm",
        action="store_true",
        help="the planner skips its grasp confirmation (the 'what is the gripper holding?' question): task success "
        "then measures the 'where' answer and the pick alone",
    )
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    if args.tasks < 1:
        ap.error("--tasks must be at least 1")
    from atp_ros.cell_loop import processes

    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    interrupt_on_signals()
    if args.frames:
        (out / "frames").mkdir(exist_ok=True)
    ns = f"/cell_eval_{os.getpid()}"
    sim = vlm = loop = None
    results: list[Scored] = []
    interrupted = False
    try:
        sim = processes.start_sim(
            ns,
            out / "logs" / "cell_sim.log",
            width=args.width,
            height=args.height,
            camera_rate=args.camera_rate,
            time_scale=args.time_scale,
            seed=args.seed,
        )
        vlm = processes.start_perception(
            ns, args.model, out / "logs" / "vlm_node.log", max_new_tokens=args.max_new_tokens, device=args.device
        )
        planner = {
            "speed_scale": 1.0,
            "max_age_s": 2.0 / args.camera_rate + 0.5,
            "target_from": args.target_from,
            "confirm": not args.no_confirm,
        }
        loop = Loop(ns, planner)
        interrupt_on_signals()
        loop.wait(lambda: loop.planner.ask.server_is_ready() or vlm.poll() is not None, 900, "the perception node")
        if vlm.poll() is not None:
            raise RuntimeError(f"vlm_node exited:\n{processes.log_tail(out / 'logs' / 'vlm_node.log')}")
        for setting in args.settings:
            loop.set_params(loop.vlm_params, SETTINGS[setting], "atp_vlm")
            for seed in range(args.seed, args.seed + args.tasks):
                truth = loop.reset(seed, settle_s=0.1)
                chosen = choose_task(truth["frame"], seed)
                if chosen is None:
                    print(f"{setting} seed {seed}: no nameable item in view, skipped", flush=True)
                    continue
                task, target = chosen
                with loop.lock:
                    loop.frames = []
                loop.keep_frames = args.frames
                report = loop.planner.run_task(task)
                time.sleep(0.3)  # the release event and its truth
                loop.keep_frames = False
                with loop.lock:
                    grasped = [e["id"] for e in loop.events if e["event"] == "grasped"]
                    state = loop.truth["state"] if loop.truth else {"objects": []}
                    frames = [f for _, f in loop.frames]
                place = next((o["place"] for o in state["objects"] if o["id"] == target["id"]), None)
                report["delivered"] = place == "conveyor"
                scored = score(setting, seed, task, target, report, grasped)
                results.append(scored)
                print(
                    f"{setting} seed {seed}: {task!r} -> answer {report.get('answer')!r} "
                    f"(truth {target['where']}): {'success' if scored.success else scored.cause} "
                    f"in {report['timings'].get('total_s')} s",
                    flush=True,
                )
                if args.frames:
                    caption = [
                        f"{setting} seed {seed}: {task}",
                        f"where? -> {report.get('answer')!r} (truth {target['where']}); holding? -> "
                        f"{report.get('confirm_answer')!r}",
                        f"{'SUCCESS' if scored.success else 'FAILED: ' + str(scored.cause)} ({report.get('message')})",
                    ]
                    frame_strip(frames, caption, out / "frames" / f"{setting}_seed{seed}.png")
                    task_clip(frames, out / "frames" / f"{setting}_seed{seed}.gif", args.camera_rate)
    except (RuntimeError, TimeoutError) as err:
        print(f"cell_eval: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # keep what was measured: the report covers the tasks done so far
        interrupted = True
    finally:
        if loop is not None:
            loop.close()
        for child in (vlm, sim):
            if child is not None:
                processes.stop(child)
    summary = summarize(results, args.settings)
    meta = {
        "model": args.model,
        "tasks": args.tasks,
        "seeds": f"{args.seed}..{args.seed + args.tasks - 1}",
        "camera": f"{args.width}x{args.height} at {args.camera_rate:g} Hz",
        "time_scale": args.time_scale,
        "machine": f"{os.cpu_count()} CPUs",
        "target_from": args.target_from,
        "grasp_confirmation": not args.no_confirm,
        "interrupted": interrupted,
    }
    (out / "report.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "tasks": [r.__dict__ for r in results]}, indent=1)
    )
    (out / "report.md").write_text(markdown(summary, meta))
    plot(summary, out / "success.png")
    print(markdown(summary, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
