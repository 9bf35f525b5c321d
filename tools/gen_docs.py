"""Regenerate the generated blocks of README.md and docs/*.md from their sources.

A generated block sits between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->``;
everything outside the markers is hand-written and left alone. Sources: the node's parameter
table (``atp_ros.ros.params.PARAMS``) and the shipped ``config/vlm.yaml``, and the result files
that ``make model-card`` (copied to ``docs/model_card.json``) and ``make bench``
(``bench/results/*.json``) write.

    python tools/gen_docs.py          # rewrite every stale block
    python tools/gen_docs.py --check  # exit 1 naming the stale blocks (what atp_ros/test/test_docs.py runs)
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
VLM_YAML = ROOT / "atp_ros" / "config" / "vlm.yaml"
MODEL_CARD_JSON = ROOT / "docs" / "model_card.json"
MODEL_CARD_CELL_JSON = ROOT / "docs" / "model_card_cell.json"
FLOPS_JSON = ROOT / "bench" / "results" / "flops.json"
REALISTIC_JSON = ROOT / "bench" / "results" / "realistic.json"
NODE_JSON = ROOT / "bench" / "results" / "node.json"
TRANSPORT_JSON = ROOT / "bench" / "results" / "transport.json"
SERVE_JSON = ROOT / "bench" / "results" / "serve.json"
PACKAGE = ROOT / "atp_ros" / "atp_ros"

# The parameters README shows (the full table is docs/parameters.md); which ones is a choice, their rows are generated.
README_PARAMS = (
    "model_id",
    "device",
    "backend",
    "cameras",
    "image_transport",
    "max_new_tokens",
    "atp.enabled",
    "atp.keep_ratio",
    "atp.alpha",
    "atp.mass",
)
HEADLINE_KEEPS = (1.0, 0.6, 0.4, 0.25, 0.11)


def _code(value: Any) -> str:
    """A parameter value as the YAML / ``ros2 param set`` spelling, in backticks."""
    if value == ():
        return "unset"
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (tuple, list)):
        text = "[" + ", ".join(str(v) for v in value) + "]"
    elif isinstance(value, str):
        text = value if value else '""'
    else:
        text = str(value)
    return f"`{text}`"


def _escape(text: str) -> str:
    """Plain text for a markdown table cell: no column breaks, tags or emphasis."""
    for char, escaped in (("|", "\\|"), ("*", "\\*"), ("~", "\\~"), ("<", "&lt;"), (">", "&gt;")):
        text = text.replace(char, escaped)
    return text


def _range(param: Any) -> str:
    low, high = getattr(param, "low", None), getattr(param, "high", None)
    if low is None and high is None:
        return ""
    return f"[{low}, {high}]"


def shipped_values(path: Path = VLM_YAML) -> dict[str, Any]:
    """The parameters ``config/vlm.yaml`` sets, flattened to dotted names (``atp.alpha``)."""
    doc = yaml.safe_load(path.read_text())
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: dict) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(name + ".", value)
            else:
                flat[name] = value

    for section in doc.values():
        walk("", section.get("ros__parameters", {}))
    return flat


def _param_rows(params: Any, shipped: dict[str, Any]) -> list[str]:
    rows = []
    for p in params:
        in_file = _code(shipped[p.name]) if p.name in shipped and shipped[p.name] != p.default else ""
        choices = " ".join(f"`{c}`" for c in getattr(p, "choices", ()))
        runtime = "yes" if getattr(p, "runtime", False) else ""
        description = _escape(p.description)
        rows.append(
            f"| `{p.name}` | {_code(p.default)} | {in_file} | {_range(p)} | {choices} | {runtime} | {description} |"
        )
    return rows


_PARAM_HEADER = [
    "| parameter | default | `config/vlm.yaml` | range | choices | run time | meaning |",
    "| --- | --- | --- | --- | --- | --- | --- |",
]


def parameters_table() -> str:
    """Every node parameter: name, default, the shipped file's value where it differs, range, choices, run time."""
    from atp_ros.ros.params import PARAMS

    return "\n".join(_PARAM_HEADER + _param_rows(PARAMS, shipped_values()))


def readme_parameters() -> str:
    """README's rows of :data:`README_PARAMS`, in that order."""
    from atp_ros.ros.params import PARAMS

    by_name = {p.name: p for p in PARAMS}
    return "\n".join(_PARAM_HEADER + _param_rows([by_name[n] for n in README_PARAMS], shipped_values()))


def _flops_row(flops: dict, model: str, keep: float) -> dict:
    rows = [r for r in flops["rows"] if r["model"] == model]
    full = next(r for r in rows if r["keep_ratio"] == 1.0)
    row = next(r for r in rows if r["keep_ratio"] == keep)
    return {**row, "pipeline_vs_full": row["pipeline_gflops"] / full["pipeline_gflops"]}


def _speedup(realistic: dict, checkpoint: str, keep: float) -> float:
    variant = "full" if keep == 1.0 else f"atp {keep:g}"
    for run in realistic["runs"]:
        for r in run:
            if (r["checkpoint"], r["device"], r["max_new_tokens"], r["variant"]) == (checkpoint, "cpu", 1, variant):
                return r["measured_speedup"]
    raise KeyError(f"{checkpoint} {variant} not in {REALISTIC_JSON.name}")


def headline() -> str:
    """README's one results table: accuracy kept (model card), FLOPs and KV saved (analytic), time saved (measured)."""
    card = json.loads(MODEL_CARD_JSON.read_text())
    flops = json.loads(FLOPS_JSON.read_text())
    realistic = json.loads(REALISTIC_JSON.read_text())
    header = (
        "keep ratio",
        "warehouse-tiny tokens kept",
        "ATP accuracy / evidence recall",
        "random accuracy / evidence recall",
        "llava-1.5-7b visual tokens",
        "LLM prefill FLOPs (x full)",
        "pipeline FLOPs (x full)",
        "KV cache fp16",
        "ViT-L/14-336 + Qwen2-0.5B frame speed-up (CPU)",
    )
    model = card.get("model", "warehouse-tiny")
    header = (header[0], f"{model} tokens kept", *header[2:])
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    tiny_all = round(card["selectors"]["atp@1.0"]["tokens_kept"])
    llava_all = _flops_row(flops, "llava-1.5-7b", 1.0)["visual_tokens"]
    for keep in HEADLINE_KEEPS:
        atp = card["selectors"][f"atp@{keep}"]
        rnd = card["selectors"][f"random@{keep}"]
        f7 = _flops_row(flops, "llava-1.5-7b", keep)
        cells = (
            f"{keep}",
            f"{round(atp['tokens_kept'])} of {tiny_all}",
            f"{atp['accuracy']:.3f} / {atp['evidence_recall']:.2f}",
            f"{rnd['accuracy']:.3f} / {rnd['evidence_recall']:.2f}",
            f"{f7['visual_tokens']} of {llava_all}",
            f"{f7['llm_prefill_vs_full']:.2f}",
            f"{f7['pipeline_vs_full']:.2f}",
            f"{f7['kv_cache_mib_fp16']:.0f} MiB",
            f"{_speedup(realistic, 'clip-l336-qwen2-0.5b', keep):.2f}x",
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def node_throughput() -> str:
    """The node over DDS per Fast DDS transport, from ``bench/results/node.json`` (``bench_node.py``)."""
    node = json.loads(NODE_JSON.read_text())
    names = {"default": "default (UDP)", "LARGE_DATA": "`FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA`",
             "profile": "shipped profile (`fastdds_large_frames.xml`)"}  # fmt: skip
    lines = [
        "| transport | answered / sent | answers/s | lost in transport | dropped busy | stamp→answer p50 / p99 "
        "| node overhead p50 (of which slot wait) | inference p50 | node RSS |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in node["transports"].items():
        lines.append(
            f"| {names.get(name, name)} | {r['frames_answered']} / {r['frames_sent']} | {r['answers_per_s']:.1f} "
            f"| {r['frames_lost_in_transport']} | {r['frames_dropped_busy']} "
            f"| {r['stamp_to_answer_ms_p50']:.0f} / {r['stamp_to_answer_ms_p99']:.0f} ms "
            f"| {r['node_overhead_ms_p50']:.1f} ms ({r['queue_age_ms_p50']:.1f}) | {r['inference_ms_p50']:.1f} ms "
            f"| {r['node_rss_mb']:.0f} MB |"
        )
    return "\n".join(lines)


def transport_table() -> str:
    """A 30 Hz camera into the node with Fast DDS's defaults vs the shipped profile, from ``transport.json``."""
    runs = json.loads(TRANSPORT_JSON.read_text())["runs"]
    names = {"defaults": "defaults (driver untouched)", "profile": "profile on both sides"}
    lines = ["| frame | Fast DDS | received / sent | answered / sent | lost (event) | stamp→answer p50 / p95 |",
             "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in runs:
        latency = "-" if r["stamp_to_answer_ms_p50"] is None else (
            f"{r['stamp_to_answer_ms_p50']:.0f} / {r['stamp_to_answer_ms_p95']:.0f} ms")  # fmt: skip
        lines.append(f"| {r['size']} | {names.get(r['mode'], r['mode'])} | {r['received']} / {r['sent']} "
                     f"| {r['answered']} / {r['sent']} | {r['frames_lost']} | {latency} |")  # fmt: skip
    return "\n".join(lines)


def serve_streams() -> str:
    """Ray Serve answers/s, latency and mean model-run size per stream count, from ``bench/results/serve.json``."""
    serve = json.loads(SERVE_JSON.read_text())
    streams = sorted({r["streams"] for r in serve["rows"]})
    header = ["model", "batching"] + [f"{n} stream{'s' if n > 1 else ''}" for n in streams]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    groups: dict[tuple[str, str], dict[int, dict]] = {}
    for r in serve["rows"]:
        groups.setdefault((r["model"], r["batching"]), {})[r["streams"]] = r
    for (model, batching), by_streams in groups.items():
        cells = []
        for n in streams:
            r = by_streams[n]
            sizes = {int(k): v for k, v in r["batch_sizes"].items()}
            mean_batch = sum(k * v for k, v in sizes.items()) / sum(sizes.values())
            latency = f"{r['latency_ms_p50']:.0f} / {r['latency_ms_p99']:.0f} ms"
            cells.append(f"{r['answers_per_s']:.2f}/s, {latency}, {mean_batch:.1f}")
        lines.append(f"| {model} | {batching} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _card_tables(path: Path) -> str:
    """The tables ``make model-card`` writes to ``model_card.md``, from a copy of its ``model_card.json``."""
    from atp_ros.warehouse.model_card import markdown

    report = json.loads(path.read_text())
    return markdown(report, report["validation"]).rstrip("\n")


def model_card_tables() -> str:
    """warehouse-tiny's model card tables (``docs/model_card.json``)."""
    return _card_tables(MODEL_CARD_JSON)


def model_card_cell_tables() -> str:
    """warehouse-cell's model card tables (``docs/model_card_cell.json``)."""
    return _card_tables(MODEL_CARD_CELL_JSON)


def _summary(path: Path) -> str:
    """The first paragraph of a module's docstring on one line, in markdown (read with ast: nothing is imported)."""
    doc = (ast.get_docstring(ast.parse(path.read_text())) or "").strip()
    text = " ".join(doc.split("\n\n")[0].split())
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text).replace("``", "`")  # reST roles and literals
    for char, escaped in (("|", "\\|"), ("<", "&lt;"), (">", "&gt;")):
        text = text.replace(char, escaped)
    return text


def module_index(package: Path = PACKAGE) -> str:
    """Every module of the package with the first line of its docstring, by subsystem folder."""
    lines = ["| module | what |", "| --- | --- |"]
    for path in sorted(package.rglob("*.py"), key=lambda p: (len(p.relative_to(package).parts) > 1, p.as_posix())):
        rel = path.relative_to(package)
        if "__pycache__" in rel.parts or rel.parts[0] == "models":
            continue
        name = rel.parent.as_posix() + "/" if path.name == "__init__.py" else rel.as_posix()
        lines.append(f"| `{'' if name == './' else name}` | {_summary(path)} |".replace("| `` |", "| `atp_ros/` |"))
    return "\n".join(lines)


# block name -> (file relative to the repository root, generator)
BLOCKS: dict[str, tuple[str, Callable[[], str]]] = {
    "parameters": ("docs/parameters.md", parameters_table),
    "readme-parameters": ("README.md", readme_parameters),
    "headline": ("README.md", headline),
    "model-card": ("docs/model_card.md", model_card_tables),
    "model-card-cell": ("docs/model_card_cell.md", model_card_cell_tables),
    "modules": ("docs/architecture.md", module_index),
    "node-throughput": ("docs/performance.md", node_throughput),
    "serve-streams": ("docs/serving.md", serve_streams),
    "transport": ("docs/node.md", transport_table),
}


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- generated:{re.escape(name)} -->\n)(.*?)(<!-- /generated:{re.escape(name)} -->)", re.S)


def render(text: str, name: str, body: str) -> str:
    """``text`` with block ``name``'s content replaced by ``body``; ValueError when the markers are missing."""
    pattern = _pattern(name)
    if not pattern.search(text):
        raise ValueError(f"no <!-- generated:{name} --> ... <!-- /generated:{name} --> block")
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(3), text, count=1)


def stale(root: Path = ROOT) -> list[str]:
    """Names of the blocks whose file differs from what the generator gives now."""
    out = []
    for name, (rel, generate) in BLOCKS.items():
        text = (root / rel).read_text()
        if render(text, name, generate()) != text:
            out.append(f"{name} ({rel})")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gen_docs", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 when a block is stale")
    args = ap.parse_args(argv)
    if args.check:
        bad = stale()
        for name in bad:
            print(f"stale: {name}; run python tools/gen_docs.py", file=sys.stderr)
        return 1 if bad else 0
    for name, (rel, generate) in BLOCKS.items():
        path = ROOT / rel
        text = path.read_text()
        new = render(text, name, generate())
        if new != text:
            path.write_text(new)
            print(f"updated {name} in {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
