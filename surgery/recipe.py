"""The recipe format (recipe.json): its version, its written schema, and the source allow-list.

Plain data shared by the pipeline (which writes recipes), the artifact reader and the model
builder, so none of them imports another for it. A recipe from disk is checked against
``schemas/recipe.schema.json`` (types, ranges, known keys) after a nesting-depth limit,
before anything is built; each pass then checks its own plan on replay.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from .validate import MAX_DEPTH, ValidationError, at, parse_json

RECIPE_FORMAT = "surgery.recipe/1"
SCHEMA_PATH = Path(__file__).parent / "schemas" / "recipe.schema.json"
MAX_RECIPE_BYTES = 64 << 20  # a recipe of resnet50 with every pass is ~100 KB

# timm.create_model / torchvision get_model arguments a recipe may carry. Anything else is
# refused: several (checkpoint_path, pretrained_cfg_overlay, cache_dir, ...) read files.
SOURCE_KWARGS = {
    "timm": ("num_classes", "in_chans", "img_size", "global_pool", "drop_rate", "drop_path_rate"),
    "torchvision": ("num_classes",),
}


@functools.cache
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def _message(err: Any) -> str:
    """One short line for a jsonschema error (its own messages can repeat a whole object)."""
    v, kind = err.instance, err.validator
    if kind == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(k for k in v if k not in err.schema.get("properties", {}))
        return f"unknown key {extra[0]!r}" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
    if kind == "type":
        want = err.validator_value if isinstance(err.validator_value, str) else " or ".join(err.validator_value)
        return f"must be {want}, not {type(v).__name__}"
    if kind in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        return f"{v!r} is out of range ({kind} {err.validator_value})"
    if kind in ("const", "enum"):
        choices = [err.validator_value] if kind == "const" else err.validator_value
        return f"{str(v)[:60]!r} is not one of {', '.join(map(repr, choices))}"
    if kind in ("minItems", "maxItems", "maxProperties"):
        return f"has {len(v)} items ({kind} {err.validator_value})"
    if kind == "pattern":
        return f"{str(v)[:60]!r} is not a valid value here"
    msg = err.message
    return msg if len(msg) <= 160 else msg[:157] + "..."


def check_recipe(recipe: Any) -> dict[str, Any]:
    """Validate a parsed recipe against the schema; the first problem raises ValidationError."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema())
    errors = list(validator.iter_errors(recipe))
    if not errors:
        return recipe
    err = jsonschema.exceptions.best_match(errors)
    where = err.json_path
    if err.validator == "required":
        missing = next(k for k in err.validator_value if k not in err.instance)
        raise ValidationError(at(where, missing), "is missing")
    raise ValidationError(where, _message(err))


def read_recipe_file(path: Path) -> dict[str, Any]:
    """Read and validate ``path`` (recipe.json): size, nesting depth, JSON, schema."""
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise ValidationError("$", f"{path.name} is {size:,} bytes (at most {MAX_RECIPE_BYTES:,})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValidationError("$", f"{path.name} is not UTF-8 text") from None
    return check_recipe(parse_json(text, path.name, max_depth=MAX_DEPTH))


def check_source_kwargs(kind: str, kwargs: dict[str, Any], where: str = "$.source.kwargs") -> None:
    """Refuse builder arguments outside the allow-list (the API path, where no schema ran)."""
    allowed = SOURCE_KWARGS.get(kind, ())
    for key in kwargs:
        if key not in allowed:
            raise ValidationError(at(where, key), f"argument {key!r} is not allowed for a {kind} source "
                                                  f"(allowed: {', '.join(allowed)}); files are never read "
                                                  "through model arguments")
