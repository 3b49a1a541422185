"""A replayed plan comes from a file that may have been edited: each pass checks its own plan and
names the bad field by its JSON path in a one-line SurgeryError (issue 11, point 5)."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import surgery
from surgery.errors import SurgeryError
from surgery.pipeline import rebuild
from surgery.validate import ValidationError, expect_ranges

from conftest import ConvBnNet, randomize_norm_stats


def _convbn() -> nn.Module:
    torch.manual_seed(0)
    return randomize_norm_stats(ConvBnNet()).eval()


def _mlp() -> nn.Module:  # fc1 -> GELU -> fc2: the shape bilinear's scale widens
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 64), nn.GELU(), nn.Linear(64, 10)).eval()


# name -> (model, input size, passes); custom modules are also the base_model of load.
ARTIFACTS = {
    "chain": (_convbn, (3, 16, 16), ["fuse", "prune:ratio=0.5,round_to=1", "head:num_classes=7",
                                     "bilinear:min_features=8"]),
    "mlp": (_mlp, (3, 4, 4), ["bilinear:scale=2,skip=3,min_features=8"]),
    "ebcle": ("resnet18", (3, 32, 32), ["ebcle:depth=4,widen=1.5"]),
    "rescale": ("resnet18", (3, 64, 64), ["rescale:factor=0.5"]),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (artifact dir, result, base_model or None), each built once, when first asked for."""
    cache = {}

    def get(name):
        if name not in cache:
            model, size, passes = ARTIFACTS[name]
            x = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
            if isinstance(model, str):
                base, src = None, surgery.load_model(model, num_classes=10, input_size=size)
            else:
                base = src = model()
            result = surgery.apply(src, passes, example_inputs=x, measure=False)
            cache[name] = (result.save(tmp_path_factory.mktemp(name) / "art"), result, base)
        return cache[name]

    return get


def _path(step, keys):
    out = f"$.passes[{step}].plan"
    for k in keys:
        out += f"[{k}]" if isinstance(k, int) else f".{k}" if k.isidentifier() else f"[{json.dumps(k)}]"
    return out


FIRST = object()  # in a key list: the first key of that dict (group anchors are long)


def _edit(plan, keys, value):
    """Set ``plan[k0][k1]...`` to value (or value(old)); returns the keys with FIRST resolved."""
    resolved, node = [], plan
    for i, k in enumerate(keys):
        k = next(iter(node)) if k is FIRST else k
        resolved.append(k)
        if i == len(keys) - 1:
            node[k] = value(node[k]) if callable(value) else value
        else:
            node = node[k]
    return resolved


def _rename(d):
    return {"nope.weight:0": next(iter(d.values()))}


CASES = [  # artifact, step, keys to edit, new value (or old -> new), keys of the reported field if others
    ("chain", 0, ["folded", 0, 1], "nope", None),  # a name not in the graph
    ("chain", 0, ["folded"], lambda f: f[:1] + f, ["folded", 1, 0]),  # a pair twice
    ("chain", 0, ["folded", 0], "conv1", None),  # wrong type
    ("chain", 0, ["folded", 0], ["conv3", "bn3"], None),  # conv3's output also feeds the add: not foldable
    ("chain", 0, ["extra"], 1, None),  # unknown key
    ("chain", 1, ["groups", FIRST, "keep"], "0,70", None),  # index out of range
    ("chain", 1, ["groups", FIRST, "keep"], "0-2,1", None),  # duplicate index
    ("chain", 1, ["groups", FIRST, "keep"], "0-99999999999999", None),  # huge range: refused, not expanded
    ("chain", 1, ["groups", FIRST, "keep"], [0, 1], None),  # wrong type
    ("chain", 1, ["groups", FIRST, "size"], -1, None),  # negative size
    ("chain", 1, ["groups", FIRST, "size"], 10**12, None),  # huge size
    ("chain", 1, ["groups", FIRST, "size"], 3, None),  # not the group's real size
    ("chain", 1, ["groups"], _rename, ["groups", "nope.weight:0"]),  # a group the model lacks
    ("chain", 1, ["groups", FIRST, "kept"], "0", None),  # unknown key
    ("chain", 2, ["module"], "conv1", None),  # exists, but is not the classifier
    ("chain", 2, ["module"], "nope", None),
    ("chain", 3, ["layers", 0, "rank"], 0, None),
    ("chain", 3, ["layers", 0, "rank"], 10**9, None),
    ("chain", 3, ["layers", 0, "in_features"], 999, None),  # not the layer's
    ("chain", 3, ["layers", 0, "in_shape"], [1, 2], None),
    ("chain", 3, ["layers", 0, "name"], "nope", None),
    ("chain", 3, ["layers"], lambda ls: ls[:1] + ls, ["layers", 1, "name"]),  # a layer twice
    ("chain", 3, ["layers"], {"head": 1}, None),  # wrong type
    ("mlp", 0, ["widened", 0, "in_features"], 64, None),  # fc2 must take the scaled fc1's width
    ("mlp", 0, ["widened"], [], ["layers", 0, "scale"]),  # fc1 scaled, its consumer left narrow
    ("mlp", 0, ["layers", 0, "scale"], 3, None),  # not the pass's scale
    ("ebcle", 0, ["removed", 0], "layer9.9", None),
    ("ebcle", 0, ["removed"], lambda r: r[:1] + r, ["removed", 1]),  # a block twice
    ("ebcle", 0, ["removed"], lambda r: r + ["layer1.0"], ["removed"]),  # every block of stage layer1
    ("ebcle", 0, ["widen", FIRST, 0], 65, None),  # not the group's size
    ("ebcle", 0, ["widen", FIRST, 1], -5, None),
    ("rescale", 0, ["input_size"], [3, 999, 999], None),  # not what the factor gives
    ("rescale", 0, ["input_size", 1], -1, None),
    ("rescale", 0, ["layers", "conv1", "new_kernel", 0], 10**6, None),  # would exhaust memory
    ("rescale", 0, ["layers", "conv1", "kernel"], [5, 5], None),  # not the layer's present kernel
    ("rescale", 0, ["layers", "nope"], {"new_kernel": [1, 1], "new_padding": [0, 0], "new_stride": [1, 1]}, None),
]


@pytest.mark.parametrize("name, step, keys, value, reported", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_tampered_plan_is_a_one_line_error_naming_the_field(saved, tmp_path, name, step, keys, value, reported):
    d, _, base = saved(name)
    recipe = json.loads((d / "recipe.json").read_text())
    assert recipe["passes"][step]["pass"] == ARTIFACTS[name][2][step].split(":")[0]
    resolved = _edit(recipe["passes"][step]["plan"], keys, value)
    out = tmp_path / "tampered"
    out.mkdir()
    (out / "recipe.json").write_text(json.dumps(recipe))
    (out / "model.safetensors").symlink_to(Path(d, "model.safetensors").resolve())
    with pytest.raises(SurgeryError) as info:
        surgery.load(out, base_model=base)
    message = str(info.value)
    assert f"{_path(step, reported or resolved)}: " in message, message
    assert "\n" not in message


@pytest.mark.parametrize("name", list(ARTIFACTS))
def test_untampered_artifact_loads_and_matches(saved, name):
    d, result, base = saved(name)
    loaded = surgery.load(d, base_model=base)
    x = torch.randn(3, *result.input_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.model.eval()(x))


@pytest.mark.parametrize("plan, kind", [(["head"], "a list"), (None, "null")])  # null: would decide anew
def test_a_plan_that_is_no_object_is_named(saved, plan, kind):
    d, _, base = saved("chain")
    recipe = json.loads((d / "recipe.json").read_text())
    recipe["passes"][2]["plan"] = plan
    with pytest.raises(ValidationError, match=rf"^\$\.passes\[2\]\.plan: must be an object, not {kind}$"):
        rebuild(recipe, base_model=base)


@pytest.mark.parametrize("text, size, problem", [
    ("0-3,5", 8, None),
    ("", 8, "is not an index"),
    ("3-1", 8, "runs backwards"),
    ("1,x", 8, "is not an index"),
    ("0--1", 8, "is not an index"),
    ("0-3,3", 8, "index 3 appears twice"),
    ("0-" + "9" * 5000, 1000, "out of range 0..999"),  # int() of 5000 digits would raise ValueError
])
def test_expect_ranges(text, size, problem):
    if problem is None:
        assert expect_ranges(text, "$.k", size) == [0, 1, 2, 3, 5]
    else:
        with pytest.raises(ValidationError, match=problem):
            expect_ranges(text, "$.k", size)
