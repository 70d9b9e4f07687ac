"""`predict`: answers from a base with adapters active: generation, classification or an embedding.

`predict(model, tokenizer, texts)` decides what a prediction is from the model itself,
in this order:

- a causal LM (an architecture ending in `ForCausalLM` / `LMHeadModel` that can
  generate): greedy generation of `max_new_tokens`, one text at a time (a left-padded
  batch would move the positions of some architectures, so answers could differ);
- a trained task head stored with adapter `head_ref` (`deltahub train` / `fuse` for
  classification, `deltahub.training.head`), read over the pooled last hidden states;
- a base with its own classifier (`...ForSequenceClassification`, also when a PEFT
  SEQ_CLS adapter replaced it with its saved `modules_to_save` head), read from its
  logits with labels named by `config.id2label`;
- otherwise an embedding: the mean of the last hidden states over the text's tokens.

A head's (or classifier's) logits are read by its problem type: the one the head records
(`extra["head"]["problem_type"]`), for a base classifier transformers' `config.problem_type`
(None reads as regression with one output, as transformers' loss does, else single-label;
PEFT's adapter config does not record it), or the `problem_type` the caller gives:

- single-label: the argmax, `label` and `label_id`;
- regression: the outputs themselves, `values` (num_labels floats);
- multi-label: a sigmoid per label, `labels` (those >= `threshold`, 0.5 by default), their
  `label_ids`, and `probabilities` per label name.

Classification and embeddings run in padded batches of `batch_size` (right padding; the
head and the mean read only real tokens); one text alone is never padded. Each answer is
a plain dict (`kind` plus the fields of that kind), so the CLI, batch scoring and a hub
route shape their output the same way. `load` builds the model to predict with: a base
directory, its tokenizer, and registry refs composed by a mode (single, sum, average,
stack).

It lives in `training` because it reads the task heads that training writes; compose
below it knows nothing of heads.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from deltahub.errors import InvalidConfig
from deltahub.training.head import TaskHead, has_head
from deltahub.training.readout import Reading, config_problem_type, problem_type_name, rounded

MODES = ("single", "sum", "average", "stack")


@dataclass
class Loaded:
    """What `load` returns: the model with `target` active, its tokenizer, and the names
    the adapters `refs` have in it."""

    model: Any
    tokenizer: Any
    refs: list[str]
    names: list[str]
    target: Any


def composition(names: Sequence[str], mode: str = "single", weights: Sequence[float] | None = None) -> Any:
    """The block that `mode` (single, sum, average, stack) makes of resident adapters `names`."""
    from deltahub.compose.blocks import Average, Stack, Sum

    if mode == "sum":
        return Sum(*names, weights=weights)
    if mode == "average":
        return Average(*names, weights=weights)
    if mode == "stack":
        return Stack(*names)
    if mode != "single":
        raise InvalidConfig(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if len(names) == 1:
        return names[0]
    raise InvalidConfig(f"{len(names)} adapters given: say how to combine them (--sum, --average or --stack)")


def load(
    base_path: str,
    refs: Sequence[str],
    *,
    mode: str = "single",
    weights: Sequence[float] | None = None,
    force: bool = False,
    registry: Any = None,
    device: str | None = None,
    quantize: str | None = None,
) -> Loaded:
    """Load the base and tokenizer from directory `base_path` (on `device`, optionally
    `quantize`d: "nf4", "fp4", "int8"), load `refs` from the registry and activate them
    composed by `mode`.

    Two versions of one adapter (`a@1 a@2`) load side by side, as `a.v1` and `a.v2`.
    """
    from transformers import AutoTokenizer

    from deltahub.compose.base import load_base
    from deltahub.compose.model import AdaptedModel

    base = load_base(base_path, device=device, quantize=quantize)
    tokenizer = AutoTokenizer.from_pretrained(base_path, local_files_only=True)
    model = AdaptedModel(base, registry=registry)
    if model.registry is None:
        from deltahub.registry import Registry

        model.registry = Registry()
    versions = [model.registry.resolve(ref) for ref in refs]
    full_names = [v.full_name for v in versions]
    names = [
        model.load(v.ref, force=force, name=_side_by_side(v) if full_names.count(v.full_name) > 1 else None)
        for v in versions
    ]
    target = composition(names, mode, weights)
    model.activate(target)
    return Loaded(model, tokenizer, list(refs), names, target)


def _side_by_side(version: Any) -> str:
    """The name a version gets when another version of its adapter is loaded too."""
    return f"{version.full_name}.v{version.version.replace('+', '-')}"


@torch.no_grad()
def predict(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    head_ref: str | None = None,
    max_new_tokens: int = 20,
    batch_size: int = 32,
    sampling: Sampling | None = None,
    threshold: float = 0.5,
    problem_type: str | None = None,
) -> list[dict[str, Any]]:
    """One answer per text, in order (see the module doc for how the kind is chosen).

    `model` is an `AdaptedModel` with its adapters active; `head_ref` names the registry
    version whose trained classification head (if it has one) reads the output. A text
    longer than the model's maximum is cut to it (as training does); an empty text is an
    `InvalidConfig` naming its position. `sampling` (causal LMs): temperature, top-p,
    seed and the chat template; greedy by default. `problem_type` reads a base
    classifier's logits as single-label, regression or multi-label when its config does not
    say (a trained head records its own: a different one is an error); `threshold` is the
    multi-label sigmoid cut.
    """
    if isinstance(texts, str):
        raise InvalidConfig("predict takes a list of texts; wrap one text in a list")
    if batch_size <= 0:
        raise InvalidConfig(f"batch size must be positive, got {batch_size}")
    if not 0.0 <= threshold <= 1.0:
        raise InvalidConfig(f"threshold must be between 0 and 1, got {threshold}")
    if problem_type is not None:
        problem_type = problem_type_name(problem_type)
    texts = check_texts(texts)
    base = model.base
    if is_generator(base):
        sampling = sampling or Sampling()
        return [_generate(model, tokenizer, text, max_new_tokens, sampling) for text in texts]
    head = _trained_head(model, head_ref) if head_ref is not None else None
    if head is not None and problem_type not in (None, head[0].problem_type):
        raise InvalidConfig(
            f"the head of {head_ref} was trained for {head[0].problem_type}, not {problem_type}: "
            "drop the problem type to read it as trained"
        )
    reading = Reading(problem_type, threshold)
    if tokenizer.pad_token_id is None or (head is None and getattr(base.config, "pad_token_id", 0) is None):
        batch_size = 1  # nothing to pad with, or a decoder classifier that cannot find the last token
    out: list[dict[str, Any]] = []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i : i + batch_size]
        batch = _encode(model, tokenizer, chunk)
        if head is not None:
            out += _classify_with_head(model, batch, chunk, *head, head_ref, reading)  # type: ignore[arg-type]
        else:
            out += _forward(model, batch, chunk, reading)
    return out


def check_texts(texts: Sequence[str]) -> list[str]:
    """`texts` as a list; an empty one (or one of only spaces) is an error naming its position."""
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            where = "the input" if len(texts) == 1 else f"input {i + 1}"
            raise InvalidConfig(f"{where} is empty: give some text to run")
    return texts


def is_generator(base: Any) -> bool:
    """A causal LM that can generate (its predictions are generated text)."""
    archs = getattr(base.config, "architectures", None) or [type(base).__name__]
    return hasattr(base, "generate") and any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def max_length(model: Any, tokenizer: Any) -> int | None:
    """The most tokens the model reads: the tokenizer's limit, else the config's positions."""
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:  # transformers' "no limit" is ~1e30
        return limit
    config = model.base.config
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(positions) if positions else None


def _encode(model: Any, tokenizer: Any, texts: list[str], **extra: Any) -> Any:
    pad = (
        {"padding": True, "padding_side": "right"} if len(texts) > 1 else {}
    )  # the head pools the last real token
    limit = max_length(model, tokenizer)
    cut = {"truncation": True, "max_length": limit} if limit else {}
    batch = tokenizer(texts, return_tensors="pt", **pad, **cut, **extra).to(model.base.device)
    if "token_type_ids" in batch and "token_type_ids" not in inspect.signature(model.base.forward).parameters:
        batch.pop("token_type_ids")  # Llama/GPT-2 forwards do not take it
    return batch


@dataclass(frozen=True)
class Sampling:
    """How a causal LM generates: greedy (temperature None or 0), else sampled with
    `temperature` and nucleus `top_p`, seeded by `seed`; `chat` wraps the text as one user
    turn in the tokenizer's chat template when it has one ("auto"), always (True: an error
    without a template) or never (False)."""

    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    chat: bool | str = "auto"

    def __post_init__(self) -> None:
        if self.temperature is not None and self.temperature < 0:
            raise InvalidConfig(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InvalidConfig(f"top-p must be in (0, 1], got {self.top_p}")
        if self.chat not in ("auto", True, False):
            raise InvalidConfig(f"chat must be 'auto', True or False, got {self.chat!r}")

    @property
    def sample(self) -> bool:
        return bool(self.temperature)


def _prompt(tokenizer: Any, text: str, chat: bool | str) -> tuple[str, bool]:
    """The text the model reads, and whether it is a rendered chat template."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat is True and not has_template:
        raise InvalidConfig("this tokenizer has no chat template; run without --chat")
    if chat is False or not has_template:
        return text, False
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return str(rendered), True


def _generate(
    model: Any, tokenizer: Any, text: str, max_new_tokens: int, sampling: Sampling
) -> dict[str, Any]:
    prompt, templated = _prompt(tokenizer, text, sampling.chat)
    # A rendered template already holds its special tokens.
    batch = _encode(model, tokenizer, [prompt], **({"add_special_tokens": False} if templated else {}))
    if batch["input_ids"].shape[1] == 0:
        raise InvalidConfig(f"{text!r} has no tokens for this tokenizer: give some text to run")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    options: dict[str, Any] = {"do_sample": sampling.sample}
    if sampling.sample:
        options["temperature"] = sampling.temperature
        if sampling.top_p is not None:
            options["top_p"] = sampling.top_p
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=pad, **options)
    new = out[0, batch["input_ids"].shape[1] :]
    return {
        "input": text,
        "kind": "generation",
        "output_ids": new.tolist(),
        "output": tokenizer.decode(new, skip_special_tokens=templated),
    }


def _trained_head(model: Any, ref: str) -> tuple[TaskHead, list[str]] | None:
    """The classification head trained with adapter `ref` (deltahub train/fuse), if any."""
    if model.registry is None:
        from deltahub.registry import Registry

        model.registry = Registry()
    artifact = model.registry.open(ref)
    if not has_head(artifact) or artifact.manifest is None:
        return None
    config = model.base.config
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    head = TaskHead.from_artifact(artifact, int(width)).to(model.base.device).eval()
    return head, list(artifact.manifest.extra.get("head", {}).get("labels", []))


def _classify_with_head(
    model: Any, batch: Any, texts: list[str], head: TaskHead, labels: list[str], ref: str, reading: Reading
) -> list[dict[str, Any]]:
    out = model(**batch, output_hidden_states=True)
    logits = head(out.hidden_states[-1], batch.get("attention_mask"))  # (B, K)
    return [
        {**reading.answer(text, row, labels, head.problem_type), "head": ref}
        for text, row in zip(texts, logits, strict=True)
    ]


def _forward(model: Any, batch: Any, texts: list[str], reading: Reading) -> list[dict[str, Any]]:
    out = model(**batch)
    answers = []
    if hasattr(out, "logits"):
        config = model.base.config
        id2label = getattr(config, "id2label", None) or {}
        names = [str(id2label.get(i, i)) for i in range(out.logits.shape[-1])]
        problem_type = config_problem_type(config)
        return [
            reading.answer(text, row, names, problem_type)
            for text, row in zip(texts, out.logits, strict=True)
        ]
    hidden = out.last_hidden_state  # (B, T, d)
    mask = batch.get("attention_mask")
    real = torch.ones(hidden.shape[:2], dtype=torch.bool) if mask is None else mask.bool().cpu()
    for text, h, keep in zip(texts, hidden, real, strict=True):
        pooled = h[keep.to(h.device)].mean(0)  # (d,): over the text's own tokens
        answers.append(
            {
                "input": text,
                "kind": "embedding",
                "dim": int(pooled.shape[0]),
                "norm": round(float(pooled.norm()), 6),
                "head": rounded(pooled[:8]),
            }
        )
    return answers
