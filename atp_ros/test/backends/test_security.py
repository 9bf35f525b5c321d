"""Checkpoints are data, never code: no pickle is ever unpickled and no checkpoint code is ever imported.

Each refused checkpoint carries a live payload (a pickle that creates a marker file when unpickled, a
module that creates one when imported); every test also shows the payload does fire when run directly,
so "the marker is absent" means the loader never ran it.
"""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from atp_ros.backends import ModelLoadError, load_backend
from atp_ros.backends.llava import LlavaBackend
from atp_ros.backends.loading import TEXT_TOWER_SUBDIR
from atp_ros.backends.openclip_tower import (
    OPENCLIP_CONFIG,
    OPENCLIP_WEIGHTS,
    hub_weight_candidates,
    load_openclip_joint_space,
)
from atp_ros.testing.tiny.blip2 import save_tiny_openclip_tower
from atp_ros.testing.tiny.llava import save_tiny_llava
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration


class _Payload:
    """Unpickling this opens ``marker`` for writing, i.e. creates the file: code run by pickle.load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _pickle_with_payload(safetensors_file: Path, pickle_file: Path, marker: Path) -> None:
    """Replace a safetensors file by a torch.save pickle of the same tensors plus a payload."""
    state = dict(load_file(str(safetensors_file)))
    state["__payload__"] = _Payload(marker)
    torch.save(state, pickle_file)
    safetensors_file.unlink()


def _assert_payload_is_live(pickle_file: Path, marker: Path) -> None:
    assert not marker.exists()
    torch.load(pickle_file, weights_only=False)  # what a careless loader would do
    assert marker.exists()


def test_pickle_only_llava_is_refused_unread(tmp_path: Path) -> None:
    ckpt = save_tiny_llava(tmp_path / "llava", with_text_tower=False)
    marker = tmp_path / "UNPICKLED"
    _pickle_with_payload(ckpt / "model.safetensors", ckpt / "pytorch_model.bin", marker)
    for load in (lambda: load_backend(str(ckpt), device="cpu"), lambda: LlavaBackend.from_pretrained(str(ckpt))):
        with pytest.raises(ModelLoadError) as err:
            load()
        msg = str(err.value)
        assert msg.startswith(f"{ckpt} has no safetensors weights (only pytorch_model.bin); convert it")
        assert msg.endswith("(pickle files are never loaded)") and "\n" not in msg
    assert not marker.exists()
    _assert_payload_is_live(ckpt / "pytorch_model.bin", marker)


def test_pickle_only_text_tower_is_refused_unread(tmp_path: Path) -> None:
    ckpt = save_tiny_llava(tmp_path / "llava")
    tower = ckpt / TEXT_TOWER_SUBDIR
    marker = tmp_path / "UNPICKLED"
    _pickle_with_payload(tower / "model.safetensors", tower / "pytorch_model.bin", marker)
    # The bundled tower: the backend loads CLS-only and says why.
    be = load_backend(str(ckpt), device="cpu")
    assert not be.has_text_tower and any("has no safetensors weights" in n for n in be.load_notes)
    # The same tower asked for explicitly: an error naming it.
    with pytest.raises(ModelLoadError, match=r"text tower .*has no safetensors weights"):
        load_backend(str(ckpt), text_encoder_id=str(tower), device="cpu")
    assert not marker.exists()
    _assert_payload_is_live(tower / "pytorch_model.bin", marker)


def _with_remote_code(directory: Path, marker: Path, model_type: str = "") -> None:
    """Add an ``auto_map`` (remote code) to every config of ``directory``; importing it creates ``marker``."""
    (directory / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('imported')\n"
        "from transformers import LlavaConfig as EvilConfig, LlavaForConditionalGeneration as EvilModel\n"
        "from transformers import LlavaProcessor as EvilProcessor\n"
    )
    auto_map = {
        "AutoConfig": "evil.EvilConfig",
        "AutoModel": "evil.EvilModel",
        "AutoModelForImageTextToText": "evil.EvilModel",
        "AutoProcessor": "evil.EvilProcessor",
        "AutoTokenizer": ["evil.EvilProcessor", None],
    }
    for name in ("config.json", "processor_config.json", "tokenizer_config.json"):
        if (directory / name).is_file():
            cfg = json.loads((directory / name).read_text())
            cfg["auto_map"] = auto_map
            if model_type and name == "config.json":
                cfg["model_type"] = model_type
            (directory / name).write_text(json.dumps(cfg))


def test_remote_code_in_a_checkpoint_is_never_imported(tmp_path: Path) -> None:
    """transformers 5 with trust_remote_code=False: a known model_type loads the stock classes and the
    auto_map is ignored; an unknown one is refused (by us for the VLM, by transformers for a tower)."""
    ckpt = save_tiny_llava(tmp_path / "llava")
    marker = tmp_path / "IMPORTED"
    _with_remote_code(ckpt, marker)
    _with_remote_code(ckpt / TEXT_TOWER_SUBDIR, marker)
    be = load_backend(str(ckpt), device="cpu")
    assert type(be.model) is LlavaForConditionalGeneration and be.has_text_tower
    res = be.answer([np.zeros((64, 64, 3), np.uint8)], "what is here?", max_new_tokens=1)
    assert res.visual_tokens_total == [64] and len(res.answers) == 1

    _with_remote_code(ckpt, marker, model_type="evil_llava")
    with pytest.raises(ModelLoadError, match="model_type 'evil_llava' is not supported"):
        load_backend(str(ckpt), device="cpu")
    _with_remote_code(ckpt / TEXT_TOWER_SUBDIR, marker, model_type="evil_clip")
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        load_backend(str(save_tiny_llava(tmp_path / "plain")), text_encoder_id=str(ckpt / TEXT_TOWER_SUBDIR))
    assert not marker.exists()
    runpy.run_path(str(ckpt / "evil.py"))  # the payload is live
    assert marker.exists()


def test_open_clip_tower_with_only_pickle_weights_is_refused_unread(tmp_path: Path) -> None:
    tower = save_tiny_openclip_tower(tmp_path / "tower", vision_width=32)
    marker = tmp_path / "UNPICKLED"
    _pickle_with_payload(tower / OPENCLIP_WEIGHTS, tower / "open_clip_pytorch_model.bin", marker)
    with pytest.raises(ModelLoadError, match=r"has no safetensors weights .*\(pickle files are never loaded\)"):
        load_openclip_joint_space(str(tower))
    assert not marker.exists()
    _assert_payload_is_live(tower / "open_clip_pytorch_model.bin", marker)


def _cache_repo(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    """Lay ``files`` out as the Hugging Face cache holds revision ``main`` of ``repo_id``."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, src in files.items():
        (snapshot / name).write_bytes(src.read_bytes())


def test_open_clip_hub_sources_read_only_safetensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """hf-hub:<repo> and name:tag sources through the real HF cache, offline: the safetensors file is
    used when the repository has one, and a repository with only a pickle is refused, not unpickled
    (open_clip alone would torch.load the .bin)."""
    import huggingface_hub.constants as hub

    cache = tmp_path / "hf_cache"
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))  # what HF_HUB_CACHE / HF_HUB_OFFLINE set at start-up
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    tower = save_tiny_openclip_tower(tmp_path / "tower", vision_width=32)
    _cache_repo(
        cache, "atp/safe", {OPENCLIP_CONFIG: tower / OPENCLIP_CONFIG, OPENCLIP_WEIGHTS: tower / OPENCLIP_WEIGHTS}
    )
    local = load_openclip_joint_space(str(tower))
    hub_space = load_openclip_joint_space("hf-hub:atp/safe")
    torch.testing.assert_close(hub_space.encode_text("a red box"), local.encode_text("a red box"))

    marker = tmp_path / "UNPICKLED"
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    state = dict(load_file(str(tower / OPENCLIP_WEIGHTS)))
    torch.save({**state, "__payload__": _Payload(marker)}, pickled / "open_clip_pytorch_model.bin")
    files = {
        OPENCLIP_CONFIG: tower / OPENCLIP_CONFIG,
        "open_clip_pytorch_model.bin": pickled / "open_clip_pytorch_model.bin",
    }
    _cache_repo(cache, "atp/pickle", files)
    with pytest.raises(ModelLoadError, match=r"hf-hub:atp/pickle has no safetensors weights"):
        load_openclip_joint_space("hf-hub:atp/pickle")
    # The known BLIP-2 tower (EVA01-g-14:laion400m_s11b_b41k), not cached here: refused, no .bin fallback.
    with pytest.raises(
        ModelLoadError, match=r"timm/eva_giant_patch14_clip_224\.laion400m_s11b_b41k has no safetensors"
    ):
        load_openclip_joint_space("EVA01-g-14:laion400m_s11b_b41k")
    with pytest.raises(ModelLoadError, match="tags of EVA01-g-14: laion400m_s11b_b41k"):
        load_openclip_joint_space("EVA01-g-14:no_such_tag")
    assert not marker.exists()
    _assert_payload_is_live(pickled / "open_clip_pytorch_model.bin", marker)


def test_hub_weight_names_are_safetensors_only() -> None:
    assert hub_weight_candidates("") == [OPENCLIP_WEIGHTS]
    assert hub_weight_candidates("open_clip_pytorch_model.bin") == [OPENCLIP_WEIGHTS]
    assert hub_weight_candidates("pytorch_model.bin") == ["pytorch_model.safetensors", OPENCLIP_WEIGHTS]
    assert hub_weight_candidates("weights.safetensors") == ["weights.safetensors", OPENCLIP_WEIGHTS]
    assert hub_weight_candidates("epoch_32.pt") == [OPENCLIP_WEIGHTS]  # no .pt -> .safetensors guess


# ---------------------------------------------------------------- SROS2 policy

POLICY = Path(__file__).resolve().parents[2] / "config" / "sros2_policy.xml"
# In the policy for setups the test does not start: simulated time, image_transport: compressed.
POLICY_OPTIONAL = {"/clock", "/camera/image_raw/compressed"}


def _policy_names(enclave: str, node: str = "atp_vlm") -> dict[str, set[str]]:
    """``{"publish": {...}, "subscribe": ..., "reply": ..., "request": ..., "execute": ..., "call": ...}``:
    the fully qualified names ``enclave``'s profile allows (``~/x`` -> ``/<node>/x``, ns ``/``)."""
    import xml.etree.ElementTree as ET

    root = ET.parse(POLICY).getroot()
    assert root.tag == "policy" and root.get("version") == "0.2.0"
    (profile,) = root.findall(f"enclaves/enclave[@path='{enclave}']/profiles/profile")
    assert (profile.get("ns"), profile.get("node")) == ("/", node)
    allowed: dict[str, set[str]] = {}
    for group in profile:
        for kind, rule in group.attrib.items():
            assert rule == "ALLOW", (group.tag, kind, rule)
            names = {n.text.replace("~/", f"/{node}/", 1) for n in group}
            allowed.setdefault(kind, set()).update(names)
    return allowed


@pytest.mark.dds
def test_sros2_policy_covers_everything_the_node_uses(rclpy_context, tmp_path: Path) -> None:
    """Start the installed node as the launch file does (node atp_vlm in /, camera remapped to
    /camera/image_raw), read its topics, services and action off the ROS graph, and check each is allowed
    by the atp_vlm enclave of config/sros2_policy.xml -- and that the policy allows nothing else."""
    import subprocess
    import time

    import rclpy
    from atp_ros.ros.process import node_executable, stop_node
    from rclpy.action import get_action_server_names_and_types_by_node

    allowed = _policy_names("/atp_vlm")
    model = save_tiny_llava(tmp_path / "llava")
    cmd = [str(node_executable()), "--ros-args", "-r", "image:=/camera/image_raw", "-p", f"model_id:={model}"]
    with (tmp_path / "node.log").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    probe = rclpy.create_node("atp_policy_probe", context=rclpy_context)
    try:
        deadline = time.monotonic() + 90
        while not probe.count_publishers("/atp_vlm/answer") or not probe.count_subscribers("/atp_vlm/query"):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "node.log").read_text()
            time.sleep(0.1)
        time.sleep(1.0)  # the rest of the graph (services, action) reaches the probe too
        publishes = {n for n, _ in probe.get_publisher_names_and_types_by_node("atp_vlm", "/")}
        subscribes = {n for n, _ in probe.get_subscriber_names_and_types_by_node("atp_vlm", "/")}
        serves = {n for n, _ in probe.get_service_names_and_types_by_node("atp_vlm", "/")}
        actions = {n for n, _ in get_action_server_names_and_types_by_node(probe, "atp_vlm", "/")}
    finally:
        probe.destroy_node()
        stop_node(proc)

    def plain(names: set[str]) -> set[str]:  # the action's own topics/services are covered by its name
        return {n for n in names if "/_action/" not in n}

    assert actions == allowed["execute"] == {"/atp_vlm/ask"}
    assert {"/atp_vlm/answer", "/diagnostics", "/rosout", "/atp_vlm/transition_event"} <= publishes
    assert plain(publishes) <= allowed["publish"], plain(publishes) - allowed["publish"]
    assert plain(subscribes) <= allowed["subscribe"], plain(subscribes) - allowed["subscribe"]
    assert plain(serves) <= allowed["reply"], plain(serves) - allowed["reply"]
    # nothing in the policy the node does not use (beyond the documented optional setups)
    assert allowed["publish"] - plain(publishes) == set()
    assert allowed["subscribe"] - plain(subscribes) <= POLICY_OPTIONAL
    assert allowed["reply"] - plain(serves) == set()


def test_sros2_policy_planner_enclave_matches_the_node() -> None:
    node, planner = _policy_names("/atp_vlm"), _policy_names("/planner", node="planner")
    assert planner["call"] == node["execute"]
    assert planner["request"] == {"/atp_vlm/ask_sync"} <= node["reply"]
    assert "/atp_vlm/query" in planner["publish"] and "/atp_vlm/query" in node["subscribe"]
    assert "/atp_vlm/answer" in planner["subscribe"] and "/atp_vlm/answer" in node["publish"]
