"""A full-precision merged model for serving elsewhere: base + one LoRA, folded.

`export_merged(ref, base, out)` loads the base in full precision (whatever precision the
adapter was trained at: a QLoRA adapter on a 4-bit base shares the fp base's
fingerprint), folds the adapter in exactly (W' = W + s B A, or DoRA's m * W' / ||W'||),
and writes a plain transformers directory (`save_pretrained`: config plus safetensors
weights, and the tokenizer when the base directory has one) that vLLM, TGI or
`from_pretrained` load without deltahub. Merging into the 4-bit weights instead would add
a requantization error (`AdaptedModel.merge(..., allow_lossy=True)` reports it).

A classifier stays a classifier. A PEFT adapter saved with `task_type="SEQ_CLS"` carries
its trained `classifier`/`score` module; on a bare base (a `BertModel`, as
all-MiniLM-L6-v2 is) the base loads as `AutoModelForSequenceClassification` with that
module's number of labels, so the export is a `...ForSequenceClassification` model that
gives the adapter's logits. A task head trained by deltahub (mean or last-token pooling
plus a linear layer with bias) has no transformers class that computes it exactly, so it
is written beside the model as `deltahub_head.safetensors` and `deltahub_head.json`
(labels, pooling), and `head_note(out)` says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deltahub.errors import AlreadyExists, InvalidConfig, Unsupported


def export_merged(
    ref: str,
    base: str | Path,
    out: str | Path,
    registry: Any = None,
    dtype: str | None = None,
    force: bool = False,
) -> Path:
    """Write base `base` with adapter `ref` merged to directory `out`; return `out`."""
    from deltahub.compose.base import load_base
    from deltahub.compose.model import AdaptedModel

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise AlreadyExists(f"{out} exists and is not empty; choose a new directory")
    if isinstance(base, str) and not base:
        raise InvalidConfig("--merged needs --base: the full-precision base model directory or hub id")
    if registry is None:
        from deltahub.registry import Registry

        registry = Registry()
    version = registry.resolve(ref)
    if version.method != "lora":
        raise Unsupported(
            f"{ref} is a {version.method} adapter, which cannot be folded into the base weights; only LoRA "
            "(plain, rsLoRA, DoRA) exports --merged. Export the artifact itself (without --merged) and "
            "load it with deltahub on the base instead"
        )
    artifact = registry.open(version)
    model = AdaptedModel(
        load_base(base, dtype=dtype, device="cpu", **_classifier_class(base, artifact)), registry=registry
    )
    name = model.load(version.ref, force=force)
    model.merge(name)  # the adapter is never activated: the saved modules run their plain forward
    merged = model.base
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out))
    _copy_tokenizer(base, out)
    _write_task_head(artifact, out)
    return out


HEAD_FILE = "deltahub_head.safetensors"
HEAD_INFO = "deltahub_head.json"
SAVED_HEADS = ("classifier", "score")  # what PEFT saves for SEQ_CLS (modules_to_save)


def _classifier_class(base: str | Path, artifact: Any) -> dict[str, Any]:
    """`load_base` keywords that load a bare base as a sequence classifier, when the adapter
    is PEFT's SEQ_CLS kind with its trained head (else none)."""
    if str(artifact.config.get("task_type") or "").upper() != "SEQ_CLS":
        return {}
    weights = [
        k for k in artifact.tensors if k.endswith(".weight") and any(f".{h}." in f".{k}" for h in SAVED_HEADS)
    ]
    weights = [k for k in weights if "lora_" not in k]
    if not weights:
        return {}
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(str(base))
    if any(a.endswith("ForSequenceClassification") for a in (config.architectures or [])):
        return {}  # already a classifier
    with safe_open(str(artifact.weights_path), framework="pt") as f:
        num_labels = int(f.get_slice(weights[-1]).get_shape()[0])
    return {"model_class": _with_labels(AutoModelForSequenceClassification, num_labels)}


def _with_labels(auto: Any, num_labels: int) -> Any:
    """`auto` whose `from_pretrained` builds a head of `num_labels` outputs."""

    class WithLabels:
        @staticmethod
        def from_pretrained(*args: Any, config: Any = None, **kwargs: Any) -> Any:
            if config is not None:
                config.num_labels = num_labels
                return auto.from_pretrained(*args, config=config, **kwargs)
            return auto.from_pretrained(*args, num_labels=num_labels, **kwargs)

    return WithLabels


def _write_task_head(artifact: Any, out: Path) -> None:
    from deltahub.artifact import TASK_HEAD_PREFIX

    keys = [k for k in artifact.tensors if k.startswith(TASK_HEAD_PREFIX)]
    info = (artifact.manifest.extra.get("head") if artifact.manifest else None) or {}
    if not keys:
        return
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(artifact.weights_path), framework="pt") as f:
        tensors = {k[len(TASK_HEAD_PREFIX) :]: f.get_tensor(k).contiguous() for k in keys}
    save_file(tensors, str(out / HEAD_FILE))
    (out / HEAD_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def head_note(out: str | Path) -> str | None:
    """What an export wrote beside the model for a deltahub task head (None if nothing)."""
    info_path = Path(out) / HEAD_INFO
    if not info_path.exists():
        return None
    info = json.loads(info_path.read_text())
    return (
        f"the task head ({info.get('pooling', 'mean')} pooling, labels {info.get('labels')}) has no transformers "
        f"class that computes it exactly; it is in {HEAD_FILE} and {HEAD_INFO} beside the model: "
        f"logits = classifier.weight @ pool(last hidden states) + classifier.bias"
    )


def _copy_tokenizer(base: str | Path, out: Path) -> None:
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(out))
    except (OSError, ValueError, TypeError):
        pass  # a base without a tokenizer: the weights alone are the export
