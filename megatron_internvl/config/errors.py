"""The error a user's mistake raises, and Hydra's composition errors said in one line.

`ConfigError` is the base of configuration mistakes (a recipe, key, value or path the user can
fix); the entry points print its message once, on rank 0, and exit with 2, without a traceback.
"""

from __future__ import annotations

import difflib
import re
from typing import Any


class ConfigError(ValueError):
    """A configuration the user can fix; the message says what was found and what to change."""


def schema_keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a structured config (leaves and sections)."""
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(node, DictConfig):
        node = OmegaConf.structured(node)
    keys = []
    for key in node.keys():
        full = f"{prefix}{key}"
        keys.append(full)
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing():
            keys.extend(schema_keys(child, f"{full}."))
    return keys


def closest(word: str, choices: list[str], count: int = 3) -> str:
    """ "did you mean a, b?" for the nearest choices, or the list of choices when none is near."""
    near = difflib.get_close_matches(word, choices, n=count, cutoff=0.5)
    if near:
        return "did you mean " + " or ".join(near) + "?"
    return "choose one of " + ", ".join(sorted(choices))


def explain_composition_error(error: Exception, known_keys: list[str]) -> ConfigError:
    """One line for Hydra's multi-line composition errors (unknown recipe/cluster, unknown key,
    bad value, unparsable override)."""
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(error, MissingConfigException) and error.options is not None:
        match = re.search(r"Could not find '([^/']+)/([^']+)'", str(error))
        if match:
            group, name = match.groups()
            return ConfigError(
                f"no {group} named {name!r}; {closest(name, list(error.options))} "
                f"({group}s live in recipes/{group}/)"
            )
    cause = error.__cause__
    full_key = re.search(r"full_key: (\S+)", str(cause)) if cause is not None else None
    if full_key and re.search(r"not in|Missing key", str(cause)):
        key = full_key.group(1)
        return ConfigError(f"unknown key {key!r}; {closest(key, known_keys)}")
    if full_key:
        reason = str(cause).splitlines()[0]
        return ConfigError(f"{full_key.group(1)}: {reason}")
    if isinstance(error, OverrideParseException):
        first = str(error).splitlines()[:2]
        return ConfigError(
            " - ".join(first) + " (overrides look like key=value, e.g. train.steps=20)"
        )
    return ConfigError(" ".join(str(error).split()))
