"""Pass `head`: a new classifier with another number of classes (fresh weights).

Used to fine-tune a rewritten model on a data set with other classes; as a pass it is
replayed by `surgery.load`, so the artifact keeps the new head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..errors import SurgeryError
from ..graph import finalize, get_module, set_module
from ..validate import ValidationError, at, expect_dict, expect_name
from . import PassContext, register

# Ops a classifier's output may pass through on its way to the graph's output.
_PASSTHROUGH_MODULES = (nn.Dropout, nn.Identity, nn.Flatten)
_PASSTHROUGH_FUNCTIONS = {torch.flatten, "flatten", "view", "reshape", "squeeze", "contiguous"}


@dataclass
class HeadConfig:
    """Replace the classifier by a freshly initialised one with num_classes outputs."""

    num_classes: int = field(default=10, metadata={"doc": "outputs of the new classifier"})

    def validate(self) -> None:
        if self.num_classes < 1:
            raise SurgeryError(f"head:num_classes must be >= 1, got {self.num_classes}")


def find_classifier(gm: fx.GraphModule) -> str:
    """Name of the Linear (or 1x1 conv) whose output is the graph's output."""
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    node = output.args[0]
    for _ in range(16):
        if not isinstance(node, fx.Node):
            break
        module = get_module(gm, node)
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)):
            return node.target
        passthrough = (isinstance(module, _PASSTHROUGH_MODULES)
                       or (node.op in ("call_function", "call_method") and node.target in _PASSTHROUGH_FUNCTIONS))
        if not passthrough or not node.args:
            break
        node = node.args[0]
    raise SurgeryError("cannot find the classifier (a Linear or 1x1 conv producing the output); "
                       "this model's head cannot be replaced by the head pass")


def _check_plan(plan: dict, gm: fx.GraphModule, where: str) -> str:
    """The replayed classifier name: it must be this model's classifier, or the new head lands elsewhere."""
    expect_dict(plan, where, allowed={"module"}, required=("module",))
    name = expect_name(plan["module"], at(where, "module"), dict(gm.named_modules()), "module")
    classifier = find_classifier(gm)
    if name != classifier:
        raise ValidationError(at(where, "module"), f"{name!r} is not this model's classifier ({classifier!r})")
    return name


@register("head", HeadConfig)
def head(gm: fx.GraphModule, cfg: HeadConfig, ctx: PassContext) -> fx.GraphModule:
    name = _check_plan(ctx.plan, gm, ctx.where) if ctx.replay else find_classifier(gm)
    old = gm.get_submodule(name)
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, cfg.num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, cfg.num_classes, 1, bias=old.bias is not None)
    nn.init.trunc_normal_(new.weight, std=0.02)
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    set_module(gm, name, new.to(old.weight.device, old.weight.dtype))
    ctx.plan["module"] = name
    ctx.note(f"{name}: {old.weight.shape[0]} -> {cfg.num_classes} classes (new weights)")
    return finalize(gm)
