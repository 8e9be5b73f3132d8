"""The configuration reference page, rendered from the config dataclasses so that it cannot drift.

`reference_markdown()` returns docs/configuration.md's Markdown: every section of `SECTIONS`, every
key with its TOML type, default, allowed values (from `CHOICES`, `POSITIVE`, `NON_NEGATIVE`,
`UNIT_INTERVAL`, `MAX_SEED`, `HUB_CARD_PATTERNS`: what `tinylm.config` validates against) and
meaning (`KEY_HELP`), and the `tinylm train` flag that overrides it. The site build calls it from
docs/hooks/config_reference.py; nobody has to remember to regenerate the page.
"""

from __future__ import annotations

import dataclasses
import inspect
import json

from . import config as cfg

TOML_TYPES = {bool: "boolean", int: "integer", float: "float", str: "string"}


def toml_literal(value) -> str:
    """`value` as it is written in a TOML file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def allowed(dotted: str) -> str:
    """What `tinylm.config` accepts for `dotted`, in words ("" when any value of its type is fine)."""
    if dotted in cfg.CHOICES:
        return "one of " + ", ".join(f"`{toml_literal(choice)}`" for choice in cfg.CHOICES[dotted])
    if dotted == "training.seed":
        return f"0 to {cfg.MAX_SEED}"
    if dotted in cfg.POSITIVE:
        return "greater than 0"
    if dotted in cfg.NON_NEGATIVE:
        return "0 or more"
    if dotted in cfg.UNIT_INTERVAL:
        low, high = cfg.UNIT_INTERVAL[dotted]
        return f"at least {low} and less than {high}"
    key = dotted.split(".", 1)[1]
    if dotted.startswith("hub.") and key in cfg.HUB_CARD_PATTERNS:
        return f'`""`, or {cfg.HUB_CARD_PATTERNS[key][1]}'
    return ""


def overriding_flags() -> dict[str, str]:
    """Dotted key -> the `tinylm train` flag that overrides it."""
    from .train import (
        OVERRIDES,  # the CLI's own table; imported here only, config.py stays CLI-free
    )

    return {dotted: "--" + flag.replace("_", "-") for flag, dotted in OVERRIDES.items()}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def reference_markdown() -> str:
    """The Markdown of the configuration reference page."""
    flags = overriding_flags()
    lines = [
        "# Configuration reference",
        "",
        "A run is configured by a TOML file (`tinylm train --config FILE`; `configs/base.toml` by default)",
        "with up to four sections. Every key is optional: a missing key takes its default. An unknown",
        "section or key is an error that names the closest valid one, and a wrong type or a value out of",
        "range is an error naming the key and what was expected. The `tinylm train` flag shown under a key",
        "overrides it (flags always win over the file). Presets and how the settings play together:",
        "[Training](training.md).",
        "",
        "!!! note \"Generated from the code\"",
        "    This page is rendered from the dataclasses in `tinylm/config.py` (types, defaults and the",
        "    checks `tinylm.config` applies; meanings from `KEY_HELP`) each time the site is built.",
        "",
    ]
    for name, section in cfg.SECTIONS.items():
        doc = inspect.cleandoc(section.__doc__ or "")
        defaults = section()
        lines += [f"## `[{name}]`", "", doc, "",
                  "| key | type | default | meaning |",
                  "|---|---|---|---|"]
        for field in dataclasses.fields(section):
            dotted = f"{name}.{field.name}"
            value = getattr(defaults, field.name)
            key = f"`{field.name}`" + (f"<br>`{flags[dotted]}`" if dotted in flags else "")
            meaning = cfg.KEY_HELP[dotted]
            if allowed(dotted):
                meaning += f"<br>**Allowed:** {allowed(dotted)}"
            cells = [key, TOML_TYPES[type(value)], f"`{toml_literal(value)}`", meaning]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)
