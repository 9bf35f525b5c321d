"""The documentation stays true: generated tables in step with their sources, links to files that
exist, and README's commands naming targets, executables, launch arguments and parameters that exist."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS, ROOT / "bench" / "results" / "README.md"]
GEN_DOCS = ROOT / "tools" / "gen_docs.py"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _gen_docs():
    if not GEN_DOCS.exists():
        pytest.skip("tools/gen_docs.py is not in this tree (an installed copy of the package)")
    spec = importlib.util.spec_from_file_location("gen_docs", GEN_DOCS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation other than - and _ dropped, spaces to -."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} +(.+)$", text, re.M)}


def _commands(page: Path) -> list[str]:
    """Shell lines of the page's code blocks, continuation lines joined."""
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", page.read_text(), re.S)
    return [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]


def test_generated_blocks_match_their_sources():
    stale = _gen_docs().stale()
    assert not stale, f"stale generated blocks {stale}: run python tools/gen_docs.py"


def test_parameter_table_lists_every_parameter():
    from atp_ros.ros.params import PARAMS

    text = (ROOT / "docs" / "parameters.md").read_text()
    missing = [p.name for p in PARAMS if f"| `{p.name}` |" not in text]
    assert not missing, f"docs/parameters.md lacks {missing}"


def test_render_replaces_only_the_block():
    gen = _gen_docs()
    text = "before\n<!-- generated:x -->\nold\n<!-- /generated:x -->\nafter\n"
    assert gen.render(text, "x", "new") == "before\n<!-- generated:x -->\nnew\n<!-- /generated:x -->\nafter\n"
    with pytest.raises(ValueError):
        gen.render("no markers", "x", "new")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(page: Path):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        missing_anchor = dest.exists() and anchor and dest.suffix == ".md" and anchor not in _anchors(dest)
        if not dest.exists() or missing_anchor:
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


def test_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move detail into docs/"


def test_make_targets_in_readme_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, re.M))
    named = set(re.findall(r"`make ([a-z][\w-]*)", README.read_text())) | {
        m for line in _commands(README) for m in re.findall(r"^make ([a-z][\w-]*)", line.strip())
    }
    assert named, "README names no make target"
    assert named <= targets, f"README names make targets the Makefile lacks: {sorted(named - targets)}"


def test_ros2_commands_in_docs_name_what_exists():
    from atp_ros.ros.params import PARAMS

    setup = (ROOT / "atp_ros" / "setup.py").read_text()
    executables = set(re.findall(r'"([\w-]+) = atp_ros[\w.]*:\w+"', setup))
    launch_dir = ROOT / "atp_ros" / "launch"
    params = {p.name: p for p in PARAMS}
    problems = []
    for page in [README, *DOCS]:
        for line in _commands(page):
            line = line.split("#")[0]
            for exe in re.findall(r"ros2 run atp_ros ([\w-]+)", line):
                if exe not in executables:
                    problems.append(f"{page.name}: no executable {exe}")
            for name in re.findall(r"ros2 launch atp_ros ([\w.]+)", line):
                declared = set(re.findall(r'DeclareLaunchArgument\(\s*"(\w+)"', (launch_dir / name).read_text()))
                for arg in re.findall(r"(?<![-\w])(\w+):=", line.split(name, 1)[1]):
                    if arg not in declared:
                        problems.append(f"{page.name}: {name} declares no argument {arg}")
            if "vlm_node" in line:
                for name in re.findall(r"-p \"?([\w.]+):=", line):
                    if name not in params:
                        problems.append(f"{page.name}: vlm_node has no parameter {name}")
            for name in re.findall(r"ros2 param set /\S*atp_vlm ([\w.]+)", line):
                if name not in params or not params[name].runtime:
                    problems.append(f"{page.name}: {name} is not a run-time parameter")
    assert not problems, problems
