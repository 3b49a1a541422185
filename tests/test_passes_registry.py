import dataclasses

import pytest

from surgery import passes
from surgery.errors import SurgeryError
from surgery.passes.fuse import FuseConfig


def test_registry_lists_fuse_with_its_options():
    described = {p["name"]: p for p in passes.describe()}
    assert "fuse" in described
    fuse = described["fuse"]
    assert fuse["doc"].startswith("Fold BatchNorm")
    assert [o["name"] for o in fuse["options"]] == [f.name for f in dataclasses.fields(FuseConfig)]
    assert fuse["options"][0]["type"] == "list[str]"


def test_parse_spec_builds_typed_config():
    name, cfg = passes.parse_spec("fuse:skip=layer1.*")
    assert name == "fuse" and cfg == FuseConfig(skip=["layer1.*"])
    assert passes.parse_spec(" fuse ")[1] == FuseConfig()


@pytest.mark.parametrize("spec,message", [
    ("fusee", r"unknown pass 'fusee'; did you mean fuse\?"),
    ("fuse:skp=x", r"no option 'skp' \(did you mean skip\?\)"),
    ("fuse:skip", r"malformed option 'skip'.*key=value"),
    (":skip=x", "empty pass name"),
])
def test_bad_specs_are_one_line_errors(spec, message):
    with pytest.raises(SurgeryError, match=message) as info:
        passes.parse_spec(spec)
    assert "\n" not in str(info.value)


@dataclasses.dataclass
class _Typed:
    """A config with every supported option type."""

    ratio: float = 0.5
    steps: int = 1
    on: bool = False
    mode: str = "a"
    names: list[str] = dataclasses.field(default_factory=list)


def test_option_types_are_checked():
    passes.register("_typed_test", _Typed)(lambda gm, cfg, ctx: gm)
    try:
        cfg = passes.make_config("_typed_test", {"ratio": "0.25", "steps": "3", "on": "yes",
                                                 "names": "a+b"})
        assert cfg == _Typed(ratio=0.25, steps=3, on=True, names=["a", "b"])
        with pytest.raises(SurgeryError, match="_typed_test:steps must be an integer, got '1.5'"):
            passes.make_config("_typed_test", {"steps": "1.5"})
        with pytest.raises(SurgeryError, match="must be a number"):
            passes.make_config("_typed_test", {"ratio": "half"})
        with pytest.raises(SurgeryError, match="must be true or false"):
            passes.make_config("_typed_test", {"on": "maybe"})
    finally:
        passes._REGISTRY.pop("_typed_test")
