"""``make gpu-check``: every check that needs CUDA, in one run, one line per stage.

Stages (each writes ``<out>/<stage>.json``; ``<out>/summary.md`` collects them):

1. ``tests``: the CUDA tests of the suite (``pytest -k cuda``: exactness of every family in
   fp16/bf16 on the GPU, selectors on CUDA tensors).
2. ``realistic``: a CLIP ViT-L/14-336 tower (576 patches) in front of a LLaVA-1.5-7B-shaped and a
   Qwen2-0.5B-shaped LLM, random weights built directly on the device (nothing is carried there),
   in fp16 and bf16: per-frame latency and stage medians of the unpruned model and of ATP at keep
   0.25 / 0.11, with 1 and 16 new tokens; the speed-up of each against the unpruned model of the
   same run.
3. ``memory``: peak GPU memory above the weights per keep ratio (activations + KV cache) for the
   7B shape, 16 new tokens.
4. ``node``: the bundled warehouse-tiny through the installed node at 30 Hz over DDS
   (``bench/bench_node.py``: answered frames, stamp-to-answer latency).

Without CUDA it says so and exits 0. ``--device cpu --tiny`` runs the same code on tiny shapes
(what the CPU test suite checks). Exit 1 when any stage failed (its line says why).

    python bench/gpu_check.py [--out bench/results/gpu] [--skip tests,node]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
VIT_L336 = {
    "image_size": 336,
    "patch_size": 14,
    "vision_hidden": 1024,
    "vision_layers": 24,
    "vision_overrides": {"intermediate_size": 4096, "num_attention_heads": 16},
}
LLMS = {  # decoder shapes: (text_model kind for the shell checkpoint, config fields)
    "llava-1.5-7b": ("llama", {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                               "num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 32064}),
    "qwen2-0.5b": ("qwen2", {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                             "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936}),
}  # fmt: skip
TINY_VIT = {"image_size": 64, "patch_size": 8, "vision_hidden": 32, "vision_layers": 2}
TINY_LLM = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 128}  # fmt: skip
VARIANTS = {"full": 1.0, "atp 0.25": 0.25, "atp 0.11": 0.11}
MEMORY_KEEPS = (1.0, 0.6, 0.4, 0.25, 0.11)
QUESTION = "how many boxes are on the top shelf?"


def device_facts(device: str) -> dict:
    """What ran the check: GPU name and memory, torch and CUDA versions."""
    facts = {
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        facts |= {"gpu": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                  "capability": f"{props.major}.{props.minor}"}  # fmt: skip
    return facts


def build_backend(shell: Path, llm: dict, device: torch.device, dtype: torch.dtype):
    """A LLaVA backend whose LLM has the shape ``llm``, random weights created on ``device`` in ``dtype``.

    ``shell`` is a small checkpoint with the real tower, processor and text tower; only its
    config is read for the LLM, so a 7B-shaped decoder never goes through disk.
    """
    from atp_ros.backends.llava import LlavaBackend
    from atp_ros.backends.loading import load_text_tower
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    config = AutoConfig.from_pretrained(shell)
    text = config.text_config.to_dict() | llm
    text.pop("layer_types", None)  # per-layer lists follow num_hidden_layers: let the config derive them again
    config.text_config = type(config.text_config)(**text)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default)
    processor = AutoProcessor.from_pretrained(shell)
    load, vision_hidden, kind = LlavaBackend.joint_space_of(model)
    tower = load_text_tower(str(shell), "", partial(load, device=device, dtype=dtype), vision_hidden, kind)
    return LlavaBackend(model, processor, str(shell), tower)


def shell_checkpoint(root: Path, kind: str, tiny: bool) -> Path:
    """The small checkpoint holding the tower, processor and text tower (built once per LLM kind)."""
    from atp_ros.testing.tiny.llava import save_tiny_llava

    path = root / f"shell-{kind}{'-tiny' if tiny else ''}"
    if not (path / "config.json").is_file():
        save_tiny_llava(
            path, tower="clip", text_model=kind, text_hidden=64, text_layers=1, **(TINY_VIT if tiny else VIT_L336)
        )
    return path


def frame():
    from atp_ros.warehouse.scenes import render_scene

    return render_scene(7, 480, 640).rgb


def time_variants(backend, rounds: int) -> dict:
    """Median latency and stages per variant and token count, round-robin so drift hits all alike."""
    from atp_ros.method import AtpConfig

    image = frame()
    out: dict = {}
    for new_tokens in (1, 16):
        samples: dict[str, list] = {name: [] for name in VARIANTS}
        for r in range(rounds + 1):  # round 0 warms up every shape
            for name, keep in VARIANTS.items():
                atp = AtpConfig(enabled=keep < 1.0, keep_ratio=keep)
                result = backend.answer([image], [QUESTION], atp, max_new_tokens=new_tokens)
                if r:
                    samples[name].append(result.timings.as_dict())
        full = statistics.median(s["total"] for s in samples["full"])
        for name, runs in samples.items():
            median = {k: round(statistics.median(s[k] for s in runs), 3) for k in runs[0]}
            out[f"{name}, {new_tokens} new"] = {"ms": median, "speedup_vs_full": round(full / median["total"], 3)}
    return out


def peak_memory(backend, device: torch.device) -> dict:
    """Peak allocated GPU memory above the weights per keep ratio (16 new tokens); MiB."""
    from atp_ros.method import AtpConfig

    image = frame()
    rows = {}
    for keep in MEMORY_KEEPS:
        if device.type != "cuda":
            backend.answer([image], [QUESTION], AtpConfig(enabled=keep < 1.0, keep_ratio=keep), max_new_tokens=16)
            rows[str(keep)] = None  # CPU: no allocator statistics to read
            continue
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        backend.answer([image], [QUESTION], AtpConfig(enabled=keep < 1.0, keep_ratio=keep), max_new_tokens=16)
        torch.cuda.synchronize(device)
        rows[str(keep)] = round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)
    return {"peak_above_weights_mib": rows, "weights_mib": _weights_mib(backend)}


def _weights_mib(backend) -> float:
    return round(sum(p.numel() * p.element_size() for p in backend.model.parameters()) / 2**20, 1)


def stage_tests(args) -> dict:
    cmd = [sys.executable, "-m", "pytest", str(REPO / "atp_ros" / "test"), "-q", "-k", "cuda", "-p", "no:cacheprovider"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.stage_timeout)
    tail = proc.stdout.strip().splitlines()[-1:] or ["(no output)"]
    if proc.returncode not in (0, 5):  # 5: nothing collected
        raise RuntimeError(f"pytest -k cuda exited {proc.returncode}: {tail[0]}")
    return {"summary": tail[0], "returncode": proc.returncode}


def stage_realistic(args) -> dict:
    device = torch.device(args.device)
    results = {}
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for name, (kind, shape) in LLMS.items():
            shell = shell_checkpoint(args.work, kind, args.tiny)
            backend = build_backend(shell, TINY_LLM if args.tiny else shape, device, dtype)
            try:
                results[f"{name} {dtype_name}"] = {
                    "visual_tokens": backend.num_visual_tokens,
                    "weights_mib": _weights_mib(backend),
                    "variants": time_variants(backend, args.rounds),
                }
            finally:
                del backend
                _free(device)
    return results


def stage_memory(args) -> dict:
    device = torch.device(args.device)
    kind, shape = LLMS["llava-1.5-7b"]
    backend = build_backend(shell_checkpoint(args.work, kind, args.tiny), TINY_LLM if args.tiny else shape, device,
                            getattr(torch, args.dtypes[0]))  # fmt: skip
    try:
        return {"dtype": args.dtypes[0], **peak_memory(backend, device)}
    finally:
        del backend
        _free(device)


def stage_node(args) -> dict:
    out = args.out / "node"
    cmd = [sys.executable, str(REPO / "bench" / "bench_node.py"), "--frames", str(args.node_frames), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.stage_timeout)
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"bench_node exited {proc.returncode}: {last[0]}")
    return json.loads((out / "node.json").read_text())


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


STAGES: dict[str, Callable] = {"tests": stage_tests, "realistic": stage_realistic, "memory": stage_memory,
                               "node": stage_node}  # fmt: skip


def _headline(stage: str, result: dict) -> str:
    """The one-line summary of a finished stage."""
    if stage == "tests":
        return result["summary"]
    if stage == "realistic":
        parts = []
        for model, row in result.items():
            v = row["variants"]
            parts.append(f"{model}: full {v['full, 1 new']['ms']['total']:.1f} ms, "
                         f"atp 0.11 x{v['atp 0.11, 1 new']['speedup_vs_full']:.2f}")  # fmt: skip
        return "; ".join(parts)
    if stage == "memory":
        return f"{result['dtype']} peak above weights (MiB) per keep: {result['peak_above_weights_mib']}"
    return ", ".join(f"{k}={v}" for k, v in list(result.items())[:4]) if isinstance(result, dict) else str(result)


def run(args) -> int:
    """Run the chosen stages in order; one line each; JSON per stage and summary.md in ``args.out``."""
    args.out.mkdir(parents=True, exist_ok=True)
    facts = device_facts(args.device)
    print(f"[gpu-check] {facts.get('gpu', args.device)}: torch {facts['torch']}, CUDA {facts['cuda']}", flush=True)
    lines, failed = [], 0
    for stage, fn in STAGES.items():
        if stage in args.skip:
            continue
        started = time.monotonic()
        try:
            result = fn(args)
            line = f"{stage}: ok in {time.monotonic() - started:.0f} s: {_headline(stage, result)}"
            (args.out / f"{stage}.json").write_text(json.dumps({"facts": facts, "result": result}, indent=1) + "\n")
        except Exception as err:  # one stage failing must not hide the others' results
            failed += 1
            line = f"{stage}: FAILED after {time.monotonic() - started:.0f} s: {type(err).__name__}: {err}"
        print(f"[gpu-check] {line}", flush=True)
        lines.append(f"- {line}")
    summary = [f"# gpu-check on {facts.get('gpu', args.device)}", "", f"`{json.dumps(facts)}`", "", *lines, ""]
    (args.out / "summary.md").write_text("\n".join(summary))
    return 1 if failed else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu", help="results folder")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "atp_gpu_check",
                    help="where the small shell checkpoints are built")  # fmt: skip
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N (cpu only with --tiny, for testing)")
    ap.add_argument("--dtypes", default="float16,bfloat16", type=lambda s: s.split(","))
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds per variant")
    ap.add_argument("--node-frames", type=int, default=150, help="frames of the 30 Hz node stage")
    ap.add_argument("--skip", default="", type=lambda s: {x for x in s.split(",") if x}, help="stages to skip")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: check the plumbing, not the GPU")
    ap.add_argument("--stage-timeout", type=float, default=300.0, help="seconds a subprocess stage may take")
    args = ap.parse_args(argv)
    unknown = args.skip - set(STAGES)
    if unknown:
        ap.error(f"--skip: unknown stage(s) {', '.join(sorted(unknown))} (stages: {', '.join(STAGES)})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"[gpu-check] no CUDA device here (torch {torch.__version__}, CUDA build {torch.version.cuda}): "
              "nothing to check; run `make gpu-check` on a machine with an NVIDIA GPU", flush=True)  # fmt: skip
        return 0
    if args.device == "cpu" and not args.tiny:
        print("[gpu-check] --device cpu needs --tiny (the realistic shapes are for a GPU)", file=sys.stderr)
        return 2
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    args.work.mkdir(parents=True, exist_ok=True)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
