"""Fold BatchNorm into convolutions, check the function is unchanged, export a verified ONNX file.

    python examples/fuse_and_export.py [MODEL] [OUT]
"""

import sys
from pathlib import Path

import torch

import surgery
from surgery.report import format_table

model_name = sys.argv[1] if len(sys.argv) > 1 else "resnet50"
out = sys.argv[2] if len(sys.argv) > 2 else f"runs/{model_name}-fused"

result = surgery.apply(model_name, ["fuse"], input_size="3x160x160")
Path(out).parent.mkdir(parents=True, exist_ok=True)  # saving never creates missing parents
result.save(out, onnx=True, force=True)
print(format_table(result.report))

model = surgery.load(out)  # rebuilt from recipe.json + model.safetensors: no pickle
x = torch.randn(2, 3, 160, 160)
with torch.no_grad():
    print("reload max |diff|:", (model(x) - result.model(x)).abs().max().item())
