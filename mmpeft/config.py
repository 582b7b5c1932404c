"""Recipe configs: a YAML file plus `dotted.key=value` overrides from the command line.

An override may only set a key the file already has, so a typo is an error rather than a
setting that silently does nothing. Values are parsed as YAML (`true`, `1e-3`, `[a, b]`).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` as a string; here it is a float, as in YAML 1.2 and Python."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)[eE][-+]?\d+$|^[-+]?(?:\d[\d_]*\.[\d_]*|\.\d[\d_]*)$"
               r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def _parse(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def load_config(path: str | Path, overrides: list[str] = ()) -> dict:
    """The config at `path` with `overrides` applied; every bad override is reported at once."""
    path = Path(path)
    try:
        config = _parse(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read config: {err}") from err
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            problems.append(f"'{item}' is not key=value")
            continue
        node, parts = config, key.split(".")
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                break
        if not isinstance(node, dict) or parts[-1] not in node:
            problems.append(f"'{key}' is not a key of {path}")
            continue
        node[parts[-1]] = _parse(raw)
    if problems:
        raise ValueError("config overrides: " + "; ".join(problems))
    return config


def fill(config: dict, **values: str) -> dict:
    """A copy with `{name}` in every string replaced by `values[name]` (e.g. `{world}`)."""

    def walk(node):
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        if isinstance(node, str):
            for name, value in values.items():
                node = node.replace("{" + name + "}", str(value))
        return node

    return walk(copy.deepcopy(config))

