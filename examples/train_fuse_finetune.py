"""Train a baseline on the built-in digits set, rewrite it, and recover with distillation.

    python examples/train_fuse_finetune.py
"""

from pathlib import Path

import surgery
from surgery.tasks import evaluate_model, finetune, train
from surgery.train import TrainConfig

Path("runs/example").mkdir(parents=True, exist_ok=True)  # saving never creates missing parents
base = train("resnet18", "digits", TrainConfig(epochs=3), out="runs/example/base", force=True)
print("baseline val top-1:", base.metrics["val_top1"])

result = surgery.apply("runs/example/base", ["fuse"], measure=False)
result.save("runs/example/fused", force=True)
print("after fuse:", evaluate_model("runs/example/fused", "digits")["val_top1"])

tuned = finetune(result.as_loaded(), "digits", TrainConfig(epochs=1, lr=1e-3, warmup_epochs=0),
                 teacher=base.model, out="runs/example/tuned", force=True)
print("after a distilled epoch:", tuned.metrics["val_top1"])
