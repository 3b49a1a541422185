"""`--config FILE`: a verb's options from YAML or JSON, the command line overriding them.

The file maps option names (``batch_size`` or ``batch-size``, ``pass`` or ``passes``,
``model``) to values; it becomes command-line tokens added to the user's own, so argparse
checks every value as it checks a flag. A flag given on the command line wins: the file's
value for it is dropped (for repeatable ones, such as ``--pass``, the whole list).
"""

from __future__ import annotations

import argparse
import difflib
import json
from pathlib import Path
from typing import Any

from .errors import SurgeryError

MAX_CONFIG_BYTES = 1 << 20
MODEL_KEY = "model"


def read_config(path: str | Path) -> dict[str, Any]:
    """A mapping of option names to values, read with yaml.safe_load (JSON is YAML too)."""
    p = Path(path)
    if not p.is_file():
        raise SurgeryError(f"config file {str(p)!r} not found")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise SurgeryError(f"config file {p} is over {MAX_CONFIG_BYTES >> 20} MiB; is it the right file?")
    text = p.read_text(encoding="utf-8", errors="replace")
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - yaml and json raise their own types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SurgeryError(f"cannot read config file {p} ({first[:160]}); write YAML or JSON") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise SurgeryError(f"config file {p} must map option names to values (e.g. `epochs: 3`)")
    return data


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every optional action of ``parser`` under each of its names, with - and _ alike."""
    out: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "config"):
            continue
        names = {action.dest} | {s.lstrip("-") for s in action.option_strings if s.startswith("--")}
        for name in names:
            out[name.replace("-", "_")] = action
    return out


def _given(action: argparse.Action, argv: list[str]) -> bool:
    return any(tok == s or tok.startswith(s + "=") for tok in argv for s in action.option_strings)


def config_tokens(parser: argparse.ArgumentParser, data: dict[str, Any], argv: list[str], path: str,
                  *, model_given: bool) -> list[str]:
    """Command-line tokens for ``data``; options that ``argv`` sets itself are left to it."""
    options = _options(parser)
    tokens: list[str] = []
    for key, value in data.items():
        name = key.replace("-", "_")
        if name == MODEL_KEY:
            if not model_given:
                tokens.insert(0, str(value))
            continue
        action = options.get(name)
        if action is None:
            close = difflib.get_close_matches(name, options, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise SurgeryError(f"{path}: unknown option {key!r} for `surgery {parser.prog.split()[-1]}`{hint}")
        if _given(action, argv) or value is None:
            continue
        flag = action.option_strings[-1] if action.option_strings[-1].startswith("--") else action.option_strings[0]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise SurgeryError(f"{path}: option {key!r} is a switch; give true or false, not {value!r}")
            if value == isinstance(action, argparse._StoreTrueAction):
                tokens.append(flag)
        elif isinstance(action, argparse._AppendAction):
            for item in value if isinstance(value, list) else [value]:
                tokens += [flag, str(item)]
        elif action.nargs == "?" and value is True:  # --resume: on, in --out
            tokens.append(flag)
        elif action.nargs in ("+", "*"):
            tokens += [flag, *(str(v) for v in (value if isinstance(value, list) else [value]))]
        else:
            if isinstance(value, (list, dict)):
                raise SurgeryError(f"{path}: option {key!r} takes one value, not {json.dumps(value)[:60]}")
            tokens += [flag, str(value)]
    return tokens
