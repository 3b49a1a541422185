"""`surgery predict`: classify images with an exported ONNX file, prepared as its metadata says.

What a deployment runs: onnxruntime, numpy and PIL, no torch. The file's metadata_props
(written by :func:`surgery.export.onnx_metadata`) give the input size, the preprocessing
(mean, std, interpolation, crop_pct) and the class names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SurgeryError

# The ONNX metadata contract, owned here (surgery.export, which imports torch, writes with it).
META_PREFIX = "surgery."
JSON_KEYS = ("input_size", "preprocess", "classes", "recipe_sha256")  # surgery.exporter is a plain name
NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")


def providers() -> list[str]:
    """CUDA first where an NVIDIA driver is loaded (without torch to ask): onnxruntime-gpu lists CUDA
    whether or not a GPU exists, and asking for it without one only logs load errors."""
    import onnxruntime as ort

    if NVIDIA_DRIVER.exists() and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def read_metadata(session: Any, path: Path) -> dict[str, Any]:
    """The surgery.* metadata of a loaded file, JSON-decoded; input_size and preprocess are required."""
    raw = session.get_modelmeta().custom_metadata_map
    meta = {}
    for key, value in raw.items():
        if key.startswith(META_PREFIX) and key[len(META_PREFIX):] in JSON_KEYS:
            try:
                meta[key[len(META_PREFIX):]] = json.loads(value)
            except ValueError:
                raise SurgeryError(f"{path}: metadata {key} is not JSON; re-export the model") from None
    missing = [k for k in ("input_size", "preprocess") if k not in meta]
    if missing:
        raise SurgeryError(f"{path} has no {' or '.join(META_PREFIX + k for k in missing)} metadata; export it with "
                           "`surgery export` or `surgery apply --onnx` (they record the preprocessing)")
    size, pre = meta["input_size"], meta["preprocess"]
    ok = (isinstance(size, list) and len(size) == 3 and all(isinstance(v, int) and 0 < v <= 16384 for v in size)
          and isinstance(pre, dict) and pre.get("interpolation") in ("bilinear", "bicubic")
          and all(isinstance(pre.get(k), list) and len(pre[k]) == size[0] for k in ("mean", "std"))
          and all(isinstance(v, (int, float)) and v > 0 for v in pre["std"])
          and (pre.get("crop_pct") is None or (isinstance(pre["crop_pct"], (int, float)) and 0 < pre["crop_pct"] <= 1)))
    if not ok:
        raise SurgeryError(f"{path}: the preprocessing metadata is malformed ({json.dumps(pre)[:120]}); "
                           "re-export the model")
    classes = meta.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise SurgeryError(f"{path}: metadata {META_PREFIX}classes is not a list of names; re-export the model")
    return meta


def prepare(image_path: str | Path, input_size: list[int], pre: dict[str, Any]) -> np.ndarray:
    """One image as the model's input (C, H, W float32): RGB, resized (and center-cropped), scaled, normalised."""
    from PIL import Image, UnidentifiedImageError

    path = Path(image_path)
    if not path.is_file():
        raise SurgeryError(f"image {str(path)!r} not found")
    try:
        with Image.open(path) as im:
            img = im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise SurgeryError(f"cannot read image {str(path)!r} ({type(exc).__name__}); is it a PNG or JPEG?") from None
    if input_size[0] != 3:
        raise SurgeryError(f"the model takes {input_size[0]} channels; predict reads RGB images (3)")
    h, w = input_size[1], input_size[2]
    resample = Image.Resampling.BICUBIC if pre["interpolation"] == "bicubic" else Image.Resampling.BILINEAR
    crop = pre.get("crop_pct")
    if crop is None:  # squash to the input size: as surgery trains and evaluates
        img = img.resize((w, h), resample)
    else:  # timm / torchvision eval: shorter side to size / crop_pct, then the center
        scale = int(min(h, w) / crop) / min(img.size)
        img = img.resize((max(w, round(img.size[0] * scale)), max(h, round(img.size[1] * scale))), resample)
        left, top = (img.size[0] - w) // 2, (img.size[1] - h) // 2
        img = img.crop((left, top, left + w, top + h))
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.asarray(pre["mean"], dtype=np.float32)) / np.asarray(pre["std"], dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def predict(onnx_path: str | Path, images: list[str | Path], *, top_k: int = 5) -> list[dict[str, Any]]:
    """Top-k classes (index, name when known, probability) of each image."""
    import onnxruntime as ort

    path = Path(onnx_path)
    if not path.is_file():
        raise SurgeryError(f"ONNX file {str(path)!r} not found")
    try:
        session = ort.InferenceSession(str(path), providers=providers())
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for damaged files
        raise SurgeryError(f"cannot load {path} with onnxruntime ({str(exc).splitlines()[0][:160]}); "
                           "re-export it") from None
    meta = read_metadata(session, path)
    batch = np.stack([prepare(p, meta["input_size"], meta["preprocess"]) for p in images])
    (logits,) = session.run([session.get_outputs()[0].name], {session.get_inputs()[0].name: batch})[:1]
    logits = np.asarray(logits, dtype=np.float64).reshape(len(images), -1)
    probs = _softmax(logits)
    classes = meta.get("classes")
    if classes is not None and len(classes) != probs.shape[1]:
        classes = None  # names for another head: show indices rather than wrong names
    out = []
    for image, p in zip(images, probs):
        order = np.argsort(-p, kind="stable")[:top_k]
        out.append({"image": str(image), "top": [
            {"index": int(i), "class": classes[i] if classes else str(int(i)), "probability": float(p[i])}
            for i in order]})
    return out


def format_predictions(results: list[dict[str, Any]]) -> str:
    return "\n".join(f"{r['image']}: " + ", ".join(f"{t['class']} ({t['probability']:.3f})" for t in r["top"])
                     for r in results)
