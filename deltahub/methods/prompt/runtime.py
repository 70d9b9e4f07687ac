"""Soft prompts: prompt tuning, prefix tuning and P-tuning v2 (deep prompts).

- Prompt tuning (Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt
  Tuning"): k learned vectors P (k, d) prepended to the input embeddings,
  [P; E(x)], initialized from random vectors or from the embeddings of a text
  (`prompt_tuning_init="TEXT"`; the token ids are repeated / cut to k, as PEFT).
- Prefix tuning (Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
  Generation"): at every attention layer l, k learned keys and values prepended to the
  layer's own, attention(q, [K_l^P; K], [V_l^P; V]). Trained through a reparameterization
  [K^P; V^P] = MLP(E') (`prefix_projection`, hidden `encoder_hidden_size`) for stability;
  the artifact stores the computed prefixes and drops the MLP.
- P-tuning v2 (Liu et al., 2022): the same deep prompts at every layer without the MLP
  (method name `ptuning-v2` when training; the artifact is a plain prefix-tuning one).

Both are run as transformers runs them, so any model with a `Cache` works (BERT-, GPT-2-
and Llama-style attention, grouped-query attention included): while the adapter is
active, a forward pre-hook on the base model rewrites the call — prompt tuning replaces
`input_ids` by `inputs_embeds = [P; E(x)]`, prefix tuning passes a `DynamicCache` already
holding the prefixes (so positions start at k, exactly as PEFT) — and extends the
attention mask by k ones (labels by k `-100`s, token type ids by k zeros). During
`generate` the first step does the same on generate's (empty) cache; later steps only
offset the mask, `cache_position` and `position_ids` by k, so the KV cache works
unchanged. Outputs keep the caller's positions: sequence outputs of prompt tuning have
the k virtual positions cut off (PEFT returns them; compare `peft_out[:, k:]`).

These adapters add positions rather than change weights, so they have no identity
initialization, cannot be merged, and do not combine: Stack/Sum/Average/Fuse and per-row
routing raise `Unsupported` (see `deltahub.compose.blocks`).

Artifacts are PEFT's (`peft_type` "PROMPT_TUNING" / "P_TUNING" / "PREFIX_TUNING"), one tensor:

    prompt_embeddings   (k, d) prompt tuning and P-tuning;  (k, L * 2 * d_kv) prefix tuning

PEFT saves what its encoder computes, not the encoder: P-tuning's MLP/LSTM output prompts
and, with `prefix_projection=true`, the prefix MLP's output. PEFT itself loads both for
inference as plain tables, so they run here exactly as prompt and prefix tuning.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from deltahub.errors import IncompatibleBase, InvalidArtifact, InvalidConfig, Unsupported
from deltahub.methods.common import AdapterModule
from deltahub.methods.lora import extras as ex
from deltahub.methods.lora.saved import build_sites

KEY = "prompt_embeddings"

# transformers 5 passes the KV cache as `cache=` (`past_key_values` is its deprecated alias,
# removed in 5.40); 4.x knows only `past_key_values`. Read whichever is set, write under the
# name the installed model's forward takes.
CACHE_NAMES = ("cache", "past_key_values")


def cache_kwarg(base: nn.Module) -> str:
    """The keyword under which this base's forward takes its KV cache."""
    name = getattr(base, "_deltahub_cache_kwarg", None)
    if name is None:
        params = inspect.signature(base.forward).parameters
        name = next((n for n in CACHE_NAMES if n in params), "past_key_values")
        object.__setattr__(base, "_deltahub_cache_kwarg", name)
    return name


def get_cache(kwargs: dict[str, Any]) -> Any:
    """The KV cache of a forward call, under either name (None when there is none)."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def task_type(base: nn.Module) -> str:
    """PEFT's task type for a base class (what PeftModel.from_pretrained dispatches on)."""
    name = type(base).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    return "FEATURE_EXTRACTION"


def dims(base: nn.Module) -> dict[str, int]:
    """Layers, hidden size, and the key/value heads and head size of the base's attention."""
    c = base.config
    hidden = getattr(c, "hidden_size", None) or c.n_embd
    heads = getattr(c, "num_attention_heads", None) or c.n_head
    layers = getattr(c, "num_hidden_layers", None) or c.n_layer
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    return {"layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim}


class VirtualTokens(AdapterModule):
    """k virtual positions added in front of every sequence; forward hooks while active."""

    supports: frozenset[str] = frozenset()  # activation alone
    num_virtual_tokens: int

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config, [], [])
        self.num_virtual_tokens = int(config["num_virtual_tokens"])
        self._hooks: list[Any] = []
        self._cut = self._full_length = 0

    def add_saved(
        self, base: nn.Module, keys: list[str], get: Callable[[str], Tensor], adapter: str
    ) -> VirtualTokens:
        """Also run the modules PEFT saved beside the prompts (a SEQ_CLS classifier, under
        `base_model.<module>.*`) while active; see `deltahub.methods.lora.extras`."""
        rest = [k for k in keys if k != KEY]
        if not rest:
            return self
        try:
            extras = ex.classify(self.config, rest, set(), self.method, prefix=ex.PROMPT_PREFIX)
        except InvalidArtifact as e:
            raise Unsupported(f"adapter {adapter!r}: {e}") from None
        sites: dict[str, Any] = {}
        self.kept = build_sites(base, extras, get, adapter, sites, prefix=ex.PROMPT_PREFIX)
        self.paths = list(sites)
        self.layers = nn.ModuleList(sites.values())
        self._by_path = dict(sites)
        return self

    def saved_tensors(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = dict(getattr(self, "kept", {}))
        for layer in self.layers:
            out.update(layer.tensors())  # type: ignore[operator]
        return out

    # subclasses: what the first step of a forward does
    def _first(self, base: nn.Module, kwargs: dict[str, Any], batch: int) -> None:
        raise NotImplementedError

    def set_active(self, base: nn.Module, active: bool) -> None:
        if active and not self._hooks:
            self._hooks = [
                base.register_forward_pre_hook(self._pre, with_kwargs=True),
                base.register_forward_hook(self._post, with_kwargs=True),
            ]
        elif not active:
            for h in self._hooks:
                h.remove()
            self._hooks = []

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _pre(self, base: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        kwargs = dict(kwargs)
        if args:  # transformers models take input_ids first
            kwargs["input_ids"], args = args[0], args[1:]
        k = self.num_virtual_tokens
        x = kwargs.get("input_ids")
        x = kwargs.get("inputs_embeds") if x is None else x
        batch = x.shape[0]
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, k), mask], dim=1)
        cache = get_cache(kwargs)
        self._cut = 0
        if cache is None or cache.get_seq_length() == 0:
            self._first(base, kwargs, batch)
        else:  # a later generation step: the cache holds the k virtual positions already
            for key in ("position_ids", "cache_position"):
                if kwargs.get(key) is not None:
                    kwargs[key] = kwargs[key] + k
        return args, kwargs

    def _post(self, base: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        k, self._cut = self._cut, 0
        if not k or not hasattr(output, "keys"):
            return output
        full = self._full_length

        def cut(t: Any) -> Any:
            # Only full-length token outputs: not pooled ones, nor generate's last-position logits.
            return t[:, k:] if isinstance(t, Tensor) and t.dim() >= 3 and t.shape[1] == full else t

        for key in ("logits", "last_hidden_state"):
            if output.get(key) is not None:
                output[key] = cut(output[key])
        if output.get("hidden_states") is not None:
            output["hidden_states"] = tuple(cut(h) for h in output["hidden_states"])
        return output


class PromptTuning(VirtualTokens):
    """Prompt tuning: [P; E(x)] at the input embeddings."""

    method = "prompt_tuning"

    def __init__(self, config: dict[str, Any], prompt: Tensor) -> None:
        super().__init__(config)
        self.prompt_embeddings = nn.Parameter(prompt)  # (k, d)

    def _first(self, base: nn.Module, kwargs: dict[str, Any], batch: int) -> None:
        k = self.num_virtual_tokens
        embeds = kwargs.pop("inputs_embeds", None)
        ids = kwargs.pop("input_ids", None)
        if embeds is None:
            embeds = base.get_input_embeddings()(ids)  # (B, T, d)
        prompt = self.prompt_embeddings.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)  # (B, k, d)
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)  # (B, k + T, d)
        self._full_length = k + embeds.shape[1]
        labels = kwargs.get("labels")
        if isinstance(labels, Tensor) and labels.dim() == 2:
            kwargs["labels"] = torch.cat([labels.new_full((batch, k), -100), labels], dim=1)
        tt = kwargs.get("token_type_ids")
        if tt is not None:
            kwargs["token_type_ids"] = torch.cat([tt.new_zeros(batch, k), tt], dim=1)
        pos = kwargs.get("position_ids")
        if pos is not None:
            kwargs["position_ids"] = torch.cat(
                [torch.arange(k, device=pos.device).expand(pos.shape[0], k), pos + k], 1
            )
        cp = kwargs.get("cache_position")
        if cp is not None:
            kwargs["cache_position"] = torch.arange(cp.shape[0] + k, device=cp.device) + cp[0]
        self._cut = k

    @classmethod
    def create(cls, base: nn.Module, config: dict[str, Any]) -> PromptTuning:
        full = prompt_config(base, config)
        k, d = full["num_virtual_tokens"], full["token_dim"]
        emb = base.get_input_embeddings()
        ids = config.get("init_token_ids")
        if full["prompt_tuning_init"] == "TEXT" and ids is None:
            from transformers import AutoTokenizer

            if not full.get("tokenizer_name_or_path") or not full.get("prompt_tuning_init_text"):
                raise InvalidConfig(
                    "prompt_tuning_init='TEXT' needs prompt_tuning_init_text and tokenizer_name_or_path "
                    "(or init_token_ids)"
                )
            tok = AutoTokenizer.from_pretrained(full["tokenizer_name_or_path"])
            ids = tok(full["prompt_tuning_init_text"])["input_ids"]
        if ids is not None:
            if not ids:
                raise InvalidConfig("the prompt init text gives no tokens")
            ids = (list(ids) * math.ceil(k / len(ids)))[:k]  # repeat, then cut to k (PEFT)
            with torch.no_grad():
                prompt = emb(torch.tensor(ids, device=emb.weight.device)).detach().clone().float()
            full["prompt_tuning_init"] = "TEXT"
        else:
            prompt = torch.randn(k, d, device=emb.weight.device)  # nn.Embedding's N(0, 1), as PEFT
        return cls(full, prompt.to(emb.weight.dtype))

    @classmethod
    def from_tensors(
        cls,
        base: nn.Module,
        config: dict[str, Any],
        keys: list[str],
        get: Callable[[str], Tensor],
        adapter: str,
    ) -> PromptTuning:
        t = _one_tensor(keys, get, adapter)
        d = dims(base)["hidden"]
        if t.ndim != 2 or t.shape[1] != d or t.shape[0] != config.get("num_virtual_tokens", t.shape[0]):
            raise IncompatibleBase(
                f"adapter {adapter!r}: prompt_embeddings is {list(t.shape)}, this base needs "
                f"[{config.get('num_virtual_tokens')}, {d}]"
            )
        emb = base.get_input_embeddings().weight
        return cls(dict(config), t.to(dtype=emb.dtype, device=emb.device)).add_saved(base, keys, get, adapter)

    def tensors(self) -> dict[str, Tensor]:
        return {KEY: self.prompt_embeddings.detach(), **self.saved_tensors()}


class PrefixTuning(VirtualTokens):
    """Prefix tuning / P-tuning v2: k keys and values prepended at every attention layer."""

    method = "prefix_tuning"

    def __init__(self, base: nn.Module, config: dict[str, Any], prefix: Tensor | None) -> None:
        super().__init__(config)
        self._dims = dims(base)
        object.__setattr__(self, "_config", base.config)
        k, width = self.num_virtual_tokens, self.width
        ref = base.get_input_embeddings().weight
        self.prefix: nn.Parameter | None = None
        self.embedding: nn.Embedding | None = None
        self.transform: nn.Sequential | None = None
        if prefix is not None:
            self.prefix = nn.Parameter(prefix.to(dtype=ref.dtype, device=ref.device))  # (k, L*2*d_kv)
        elif config.get("prefix_projection"):
            hidden = int(config.get("encoder_hidden_size") or self._dims["hidden"])
            self.embedding = nn.Embedding(k, self._dims["hidden"])  # E', PEFT's PrefixEncoder
            self.transform = nn.Sequential(
                nn.Linear(self._dims["hidden"], hidden), nn.Tanh(), nn.Linear(hidden, width)
            )
            self.to(device=ref.device, dtype=ref.dtype)
        else:
            self.prefix = nn.Parameter(torch.randn(k, width, dtype=ref.dtype, device=ref.device))
        # The artifact holds the computed prefixes; the MLP is a training device only.
        self.config = {**config, "prefix_projection": False}

    @property
    def width(self) -> int:
        d = self._dims
        return d["layers"] * 2 * d["kv_heads"] * d["head_dim"]

    def prefixes(self) -> Tensor:
        """(k, L * 2 * d_kv): the stored prefix, or the MLP's output while training with it."""
        if self.prefix is not None:
            return self.prefix
        return self.transform(self.embedding.weight)  # type: ignore[misc]

    def _first(self, base: nn.Module, kwargs: dict[str, Any], batch: int) -> None:
        from transformers import DynamicCache

        k, d = self.num_virtual_tokens, self._dims
        cache = get_cache(kwargs)
        if cache is None:
            cache = DynamicCache(config=self._config)
            for name in CACHE_NAMES:  # a None under the other name must not shadow ours
                kwargs.pop(name, None)
            kwargs[cache_kwarg(base)] = cache
        # PEFT's layout: (k, L*2, H_kv, d_h) -> per layer (B, H_kv, k, d_h) keys, then values
        p = self.prefixes().view(k, d["layers"] * 2, d["kv_heads"], d["head_dim"]).permute(1, 2, 0, 3)
        p = p.unsqueeze(1).expand(-1, batch, -1, -1, -1)  # (L*2, B, H_kv, k, d_h)
        for layer in range(d["layers"]):
            cache.update(p[2 * layer], p[2 * layer + 1], layer)
        for key in ("position_ids", "cache_position"):
            if kwargs.get(key) is not None:
                kwargs[key] = kwargs[key] + k

    @classmethod
    def create(cls, base: nn.Module, config: dict[str, Any]) -> PrefixTuning:
        return cls(base, prefix_config(base, config), None)

    @classmethod
    def from_tensors(
        cls,
        base: nn.Module,
        config: dict[str, Any],
        keys: list[str],
        get: Callable[[str], Tensor],
        adapter: str,
    ) -> PrefixTuning:
        # PEFT saves the computed prefixes (k, L * 2 * d_kv) whether or not it trained them
        # through the MLP (`prefix_projection`), and loads them as such for inference.
        t = _one_tensor(keys, get, adapter)
        model = cls(base, {**config, "prefix_projection": False}, t)
        if t.ndim != 2 or t.shape[1] != model.width or t.shape[0] != model.num_virtual_tokens:
            raise IncompatibleBase(
                f"adapter {adapter!r}: prompt_embeddings is {list(t.shape)}, this base needs "
                f"[{model.num_virtual_tokens}, {model.width}] (layers x 2 x key/value width)"
            )
        return model.add_saved(base, keys, get, adapter)

    def tensors(self) -> dict[str, Tensor]:
        return {KEY: self.prefixes().detach(), **self.saved_tensors()}


def _one_tensor(keys: list[str], get: Callable[[str], Tensor], adapter: str) -> Tensor:
    if KEY not in keys:
        raise IncompatibleBase(f"adapter {adapter!r} should hold a tensor {KEY!r}, it has {keys}")
    return get(KEY)


def _common(base: nn.Module, config: dict[str, Any], peft_type: str) -> dict[str, Any]:
    k = config.get("num_virtual_tokens", 20)
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise InvalidConfig(f"num_virtual_tokens must be a positive integer, got {k!r}")
    d = dims(base)
    return {
        "peft_type": peft_type,
        "task_type": task_type(base),
        "num_virtual_tokens": k,
        "token_dim": d["hidden"],
        "num_transformer_submodules": 1,
        "num_attention_heads": d["heads"],
        "num_layers": d["layers"],
        "modules_to_save": None,
        "inference_mode": True,
        "base_model_name_or_path": None,
    }


def prompt_config(base: nn.Module, config: dict[str, Any]) -> dict[str, Any]:
    full = _common(base, config, "PROMPT_TUNING")
    init = str(
        config.get("prompt_tuning_init", "TEXT" if config.get("prompt_tuning_init_text") else "RANDOM")
    )
    if init.upper() not in ("RANDOM", "TEXT"):
        raise InvalidConfig(f"prompt_tuning_init must be RANDOM or TEXT, got {init!r}")
    full.update(
        prompt_tuning_init=init.upper(),
        prompt_tuning_init_text=config.get("prompt_tuning_init_text"),
        tokenizer_name_or_path=config.get("tokenizer_name_or_path"),
        tokenizer_kwargs=None,
    )
    return full


def prefix_config(base: nn.Module, config: dict[str, Any]) -> dict[str, Any]:
    full = _common(base, config, "PREFIX_TUNING")
    d = dims(base)
    # PEFT's layout for grouped-query attention: token_dim is the key/value width.
    full.update(
        token_dim=d["kv_heads"] * d["head_dim"],
        num_attention_heads=d["kv_heads"],
        prefix_projection=bool(config.get("prefix_projection", False)),
        encoder_hidden_size=config.get("encoder_hidden_size") or d["hidden"],
    )
    return full


class PTuning(PromptTuning):
    """PEFT's P-tuning (`peft_type` "P_TUNING", Liu et al., 2021, "GPT Understands, Too"):
    trained through an MLP or LSTM prompt encoder, saved as the encoder's output prompts
    (k, d), which PEFT runs at inference exactly as prompt tuning: [P; E(x)]."""

    method = "p_tuning"

    @classmethod
    def create(cls, base: nn.Module, config: dict[str, Any]) -> PromptTuning:
        raise Unsupported(
            "training P-tuning's prompt encoder is not supported; train prompt tuning (method 'prompt') "
            "instead: a P-tuning artifact is its encoder's output prompts, which load and run exactly"
        )


class PTuningV2(PrefixTuning):
    """P-tuning v2: deep prompts (prefixes at every layer) trained directly, no MLP."""

    @classmethod
    def create(cls, base: nn.Module, config: dict[str, Any]) -> PrefixTuning:
        return PrefixTuning(base, prefix_config(base, {**config, "prefix_projection": False}), None)
