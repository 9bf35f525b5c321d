"""ATP-gated VLM backends on HF transformers (no ROS imports here).

``load_backend`` reads the checkpoint's ``config.json`` (local directory or hub id,
offline when the files are local) and picks the backend for its ``model_type``.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from atp_ros.backends.errors import GenerationStopped, ModelLoadError, ServiceUnavailable
from atp_ros.backends.pipeline import VlmBackend
from atp_ros.backends.results import STAGES, PixelBox, ScoringInfo, StageTimings, VlmResult
from atp_ros.method import AtpConfig

# model_type in config.json -> (module, class)
FAMILIES: dict[str, tuple[str, str]] = {
    "llava": ("atp_ros.backends.llava", "LlavaBackend"),
    "blip-2": ("atp_ros.backends.blip2", "Blip2Backend"),
    "idefics": ("atp_ros.backends.idefics", "IdeficsBackend"),
    "qwen2_5_vl": ("atp_ros.backends.qwen2_5_vl", "Qwen25VLBackend"),
    "smolvlm": ("atp_ros.backends.smolvlm", "SmolVLMBackend"),
    "idefics3": ("atp_ros.backends.smolvlm", "Idefics3Backend"),
    "llava_onevision": ("atp_ros.backends.llava_onevision", "LlavaOnevisionBackend"),
    "llava_next": ("atp_ros.backends.llava_onevision", "LlavaNextBackend"),
}


def _model_type(model_id: str) -> str:
    path = Path(model_id)
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ModelLoadError(f"{model_id}: no config.json in that directory")
        return json.loads(cfg_file.read_text()).get("model_type", "")
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model_id, trust_remote_code=False).model_type
    except Exception as err:  # hub id not cached and no network, typo, ...
        raise ModelLoadError(f"{model_id}: cannot read its config ({type(err).__name__}: {err})") from err


BUNDLED_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
# Shipped inside the package: the flat world's (`make train-tiny`) and the rendered cell's (`make train-cell`).
BUNDLED_MODELS = ("warehouse-tiny", "warehouse-cell")


def resolve_model_id(model_id: str) -> str:
    """A bundled model's name (``warehouse-tiny``, ``warehouse-cell``) -> its directory; anything else unchanged.

    A local directory of the same name wins over the bundled one.
    """
    if model_id in BUNDLED_MODELS and not Path(model_id).is_dir():
        path = BUNDLED_MODELS_DIR / model_id
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{model_id}: the bundled model is missing from {path} (reinstall atp_ros)")
        return str(path)
    return model_id


def load_backend(model_id: str, text_encoder_id: str = "", device: str = "auto", dtype: str = "auto") -> VlmBackend:
    """Load the ATP-gated backend for ``model_id``: a bundled name, a hub id or a local directory.

    Raises :class:`ModelLoadError` with one readable line on any failure.
    """
    model_id = resolve_model_id(str(model_id))
    model_type = _model_type(model_id)
    if model_type not in FAMILIES:
        raise ModelLoadError(
            f"{model_id}: model_type {model_type!r} is not supported (supported: {', '.join(sorted(FAMILIES))})"
        )
    module_name, class_name = FAMILIES[model_type]
    backend_cls = getattr(importlib.import_module(module_name), class_name)
    try:
        return backend_cls.from_pretrained(model_id, text_encoder_id=text_encoder_id, device=device, dtype=dtype)
    except ModelLoadError:
        raise
    except Exception as err:
        raise ModelLoadError(f"{model_id}: {type(err).__name__}: {err}") from err


__all__ = [
    "BUNDLED_MODELS",
    "STAGES",
    "AtpConfig",
    "GenerationStopped",
    "ModelLoadError",
    "PixelBox",
    "ScoringInfo",
    "ServiceUnavailable",
    "StageTimings",
    "VlmBackend",
    "VlmResult",
    "load_backend",
    "resolve_model_id",
]
