"""Model cards: the README.md every published version carries.

`model_card(manifest, config)` writes YAML front matter the Hugging Face Hub reads
(`base_model`, `library_name: peft` for PEFT-format artifacts, `tags`, `license`, the
metrics as `model-index`), then what the adapter is, how it was made, its lineage, and
how to load it with deltahub and (for PEFT formats) with PEFT.

The card is a function of the final manifest and the config only (no clock, no
environment), so publishing the same artifact as the same name and version always
gives the same card bytes; it is part of the version's digest like any file. `publish`
writes one when the artifact has no README.md, and rewrites one it generated itself
(an exported directory re-published under another name would otherwise carry a card
naming the old version); a README.md someone wrote (PEFT's, a team's) is kept as is.
Torch-free.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from deltahub.manifest import Manifest

CARD_MARKER = "<!-- deltahub:card -->"
_PLAIN_RE = re.compile(r"[A-Za-z][A-Za-z0-9_./-]*")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n"}
MAX_README_SNIFF = 1 << 20


def _q(value: Any) -> str:
    """A YAML scalar: plain when it cannot be read as anything else, else JSON's
    double-quoted string (valid YAML, and it escapes everything)."""
    text = str(value)
    if _PLAIN_RE.fullmatch(text) and text.lower() not in _YAML_WORDS:
        return text
    return json.dumps(text, ensure_ascii=False)


def is_peft_format(config: dict[str, Any]) -> bool:
    return "peft_type" in config


def front_matter(manifest: Manifest, config: dict[str, Any]) -> list[str]:
    lines = ["---", f"library_name: {'peft' if is_peft_format(config) else 'deltahub'}"]
    if manifest.base_model:
        lines.append(f"base_model: {_q(manifest.base_model)}")
    if manifest.license:
        lines.append(f"license: {_q(manifest.license)}")
    tags = ["deltahub", manifest.method, *([manifest.task] if manifest.task else [])]
    if is_peft_format(config):
        tags.append(str(config.get("peft_type", "")).lower())
    lines.append("tags:")
    lines += [f"- {_q(t)}" for t in dict.fromkeys(t for t in tags if t)]
    metrics = {k: v for k, v in sorted(manifest.metrics.items()) if math.isfinite(v)}
    if metrics:
        lines += [
            "model-index:",
            f"- name: {_q(manifest.name)}",
            "  results:",
            "  - task:",
            f"      type: {_q(manifest.task or 'custom')}",
            "    dataset:",
            f"      name: {_q('evaluation set')}",
            f"      type: {_q('custom')}",
            "    metrics:",
        ]
        for key, value in metrics.items():
            lines += [f"    - type: {_q(key)}", f"      value: {value!r}"]
    lines.append("---")
    return lines


def _code(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return "`" + text.replace("`", "'") + "`"


def model_card(manifest: Manifest, config: dict[str, Any]) -> str:
    """The README.md of a version (its final manifest: name and version set)."""
    ref = f"{manifest.name}@{manifest.version}" if manifest.version else manifest.name
    lines = [*front_matter(manifest, config), "", f"# {manifest.name}", ""]
    if manifest.description:
        lines += [manifest.description.strip(), ""]

    lines += ["## What it is", "", "| field | value |", "|---|---|"]
    rows: list[tuple[str, Any]] = [
        ("version", manifest.version),
        ("method", manifest.method),
        ("base model", manifest.base_model),
        ("base fingerprint", manifest.base_fingerprint),
        ("task", manifest.task),
        ("license", manifest.license),
    ]
    for key in ("r", "lora_alpha", "target_modules", "reduction_factor", "num_virtual_tokens"):
        if config.get(key) is not None:
            rows.append((f"config {key}", config[key]))
    lines += [f"| {k} | {_code(v)} |" for k, v in rows if v not in (None, "", [])]
    lines += [f"| metric {k} | {v:.6g} |" for k, v in sorted(manifest.metrics.items())]
    lines.append("")

    lines += ["## How it was made", ""]
    made = [f"- published with deltahub {manifest.tool_version}"]
    for key in ("hyperparameters", "data"):
        value = manifest.extra.get(key)
        if isinstance(value, dict) and value:
            made.append(f"- {key}: " + ", ".join(f"{k}={_code(v)}" for k, v in sorted(value.items())))
    fusion = manifest.extra.get("fusion")
    if isinstance(fusion, dict) and fusion.get("attention"):
        made.append(
            "- fusion attention (mean on the "
            + str(fusion.get("attention_on", "eval"))
            + " set): "
            + ", ".join(f"{_code(k)} {v:.3f}" for k, v in fusion["attention"].items() if isinstance(v, float))
        )
    lines += [*made, ""]

    lines += ["## Lineage", ""]
    if manifest.parents:
        lines += [f"- {p.role}: {_code(p.ref)} pinned at {_code(p.digest)}" for p in manifest.parents]
    else:
        lines.append("- none: trained or imported directly")
    lines.append("")

    lines += [
        "## How to load it",
        "",
        "With deltahub (from a hub: `deltahub remote add origin URL` first):",
        "",
        "```bash",
        f"deltahub pull {ref}",
        f"deltahub run --base BASE_MODEL_DIR {ref} --input 'some text'",
        "```",
        "",
        "```python",
        "from deltahub import AdaptedModel, load_base",
        "",
        f"model = AdaptedModel(load_base({json.dumps(manifest.base_model or 'BASE_MODEL')}))",
        f"model.activate(model.load({json.dumps(ref)}))",
        "```",
        "",
    ]
    if is_peft_format(config):
        lines += [
            "With PEFT (this directory is a PEFT adapter: `deltahub export " + ref + " DIR` writes it):",
            "",
            "```python",
            "from peft import PeftModel",
            "",
            'model = PeftModel.from_pretrained(base_model, "DIR")',
            "```",
            "",
        ]
    lines += [CARD_MARKER, ""]
    return "\n".join(lines)


def card_bytes(manifest: Manifest, config: dict[str, Any]) -> bytes:
    return model_card(manifest, config).encode("utf-8")


def keeps_readme(path: Path | None) -> bool:
    """True if an artifact's README.md is one to keep (written by someone, not by us)."""
    if path is None:
        return False
    with open(path, "rb") as f:
        head = f.read(MAX_README_SNIFF)
    return CARD_MARKER.encode() not in head
