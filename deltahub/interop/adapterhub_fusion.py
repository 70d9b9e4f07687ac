"""AdapterHub fusions (`save_adapter_fusion`) into the registry, with their constituents.

`save_adapter_fusion(dir, "a,b", use_safetensors=True)` writes `adapter_fusion_config.json`
(`{"adapter_names": [...], "config": {...}, "name": "a,b", ...}`) and
`model_adapter_fusion.safetensors` (`<site>.adapter_fusion_layer.a,b.query|key|value.*`);
the fused adapters are separate `save_adapter` directories. `publish_fusion` publishes each
constituent (converted by `deltahub.interop.adapterhub`) as `<fusion name>-<adapter name>`,
or uses a registry version you name, then the fusion pinning them by digest.

The math is the same as deltahub's fusion layer (SPEC.md fact 7; `deltahub.fusion.layer`):
query = the adapters' shared input z (`query_before_ln=False`), keys and values from the
scaled up-projections, softmax over adapters, output = sum_n p_n V u_n + h. Two differences
are exact rewrites: AdapterHub's key bias adds q . b_K to every adapter's score, which the
softmax cancels, so it is dropped; a disabled query / key / value (`"query": false`, the
"static" config's value) is the identity matrix. Refused, naming the option:
`temperature=true` (AdapterHub's T starts at 50 and falls by 0.05 at every forward call,
also in eval: the output depends on how many calls came before), `residual_before=true`,
`query_before_ln=true` unless the adapters read the sub-layer output h (then z = h),
constituents that read different inputs (AdapterHub gives all of them the last one's input,
deltahub each its own), and constituents that are not bottleneck adapters.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from deltahub.errors import InvalidArtifact
from deltahub.fileformat import read_json_file
from deltahub.interop import adapterhub as ah
from deltahub.interop import adapterhub_methods as am
from deltahub.interop.rawtensors import Raw, read, write
from deltahub.settings import MAX_CONFIG_BYTES

MAX_SIBLINGS = 1000  # directory entries looked at when finding constituents beside a fusion
CONSTITUENT_ROLE = "constituent"  # deltahub.fusion.artifact's role name (not imported: no circle)
FUSION_FIELDS = {
    "key", "query", "value", "query_before_ln", "regularization", "residual_before", "temperature",
    "value_before_softmax", "value_initialized", "dropout_prob",
}  # fmt: skip
_FUSION_KEY = re.compile(
    rf"^{am._PREFIX}{am._LAYER}\.(?P<loc>attention\.output|output|attention_adapters|output_adapters)"
    r"\.adapter_fusion_layer\.(?P<name>[^/]+)\.(?P<part>query|key|value)\.(?P<kind>weight|bias)$"
)


def is_fusion_dir(path: Path | str) -> bool:
    return (Path(path) / ah.FUSION_CONFIG).is_file() or (Path(path) / ah.PICKLES[2]).exists()


def _reads(cfg: dict[str, Any]) -> str:
    """What a converted bottleneck config reads (as BottleneckConfig.reads)."""
    if cfg["variant"] == "parallel":
        return "stream"
    return "sum" if cfg.get("original_ln_before") else "output"


def check_fusion_config(cfg: dict[str, Any], reads: set[str]) -> None:
    unknown = set(cfg) - FUSION_FIELDS
    if unknown:
        raise ah.unsupported(
            ", ".join(sorted(unknown)), "not a field of adapters 1.3.0's AdapterFusionConfig"
        )
    if cfg.get("temperature"):
        raise ah.unsupported(
            "temperature=true",
            "AdapterHub's temperature starts at 50 and falls by 0.05 at every forward call, also in "
            "eval, so its outputs depend on the number of earlier calls; deltahub's is fixed",
        )
    if cfg.get("residual_before"):
        raise ah.unsupported("residual_before=true", "deltahub adds the residual after the fusion")
    if len(reads) > 1:
        raise ah.unsupported(
            "fused adapters with different placements",
            "AdapterHub feeds every fused adapter the last one's input; deltahub feeds each its own",
        )
    if cfg.get("query_before_ln") and reads != {"output"}:
        raise ah.unsupported(
            "query_before_ln=true", "the query would be the sub-layer output h, not the adapters' input"
        )


def convert_fusion(path: Path, names: list[str], constituent_cfgs: list[dict[str, Any]]):
    """(deltahub fusion config, tensors, fusion config of AdapterHub) of a fusion directory."""
    ah.refuse_pickles(path)
    data = read_json_file(path / ah.FUSION_CONFIG, MAX_CONFIG_BYTES, "config-json")
    cfg = data.get("config")
    if not isinstance(cfg, dict):
        raise InvalidArtifact("config-schema", f"{ah.FUSION_CONFIG} needs AdapterHub's 'config' object")
    _, family = ah.model_family(data)
    if any(c.get("method") != "bottleneck" for c in constituent_cfgs):
        raise ah.unsupported("fusion over non-bottleneck adapters", "AdapterHub fuses bottleneck adapters")
    check_fusion_config(cfg, {_reads(c) for c in constituent_cfgs})
    if not (path / ah.FUSION_WEIGHTS).exists():
        raise InvalidArtifact("missing-file", f"{path} has no {ah.FUSION_WEIGHTS}")
    raw = read(path / ah.FUSION_WEIGHTS, commas=True)
    sites = am._BN_SITES[family]
    per_site: dict[str, dict[str, Raw]] = {}
    fusion_name = ",".join(names)
    for key, t in raw.items():
        m = _FUSION_KEY.match(key)
        if m is None or m["loc"] not in sites:
            raise InvalidArtifact("config-shape", f"tensor {key!r} is not an AdapterHub fusion weight")
        if m["name"] != fusion_name:
            raise InvalidArtifact("config-shape", f"tensor {key!r} is not of fusion {fusion_name!r}")
        per_site.setdefault(f"{m['layer']}.{sites[m['loc']]}", {})[f"{m['part']}.{m['kind']}"] = t
    tensors: dict[str, Raw] = {}
    for site, parts in per_site.items():
        d = next(iter(parts.values())).shape[0]
        dtype = next(iter(parts.values())).dtype
        eye = Raw.of(np.eye(d, dtype=np.float32), dtype)
        zero = Raw.of(np.zeros(d, dtype=np.float32), dtype)
        for ours, theirs, on in (
            ("fusion_query.weight", "query.weight", cfg.get("query", True)),
            ("fusion_key.weight", "key.weight", cfg.get("key", True)),
            ("fusion_value.weight", "value.weight", cfg.get("value", True)),
        ):
            if on and theirs not in parts:
                raise InvalidArtifact("shape-mismatch", f"fusion site {site} lacks {theirs}")
            tensors[f"{site}.{ours}"] = parts[theirs] if on else eye
        tensors[f"{site}.fusion_query.bias"] = (
            parts.get("query.bias", zero) if cfg.get("query", True) else zero
        )
        # key.bias: q . b_K is the same for every adapter, cancelled by the softmax
    config = {"method": "fusion", "adapters": list(names), "temperature": 1.0}
    return config, tensors, {**data, "config": cfg}


def _find_constituent(path: Path, adapter: str) -> Path:
    """The `save_adapter` directory of `adapter`: beside or inside the fusion directory."""
    roots = [path, path.parent]
    for root in roots:
        entries = sorted(itertools.islice(root.iterdir(), MAX_SIBLINGS))  # a bounded look around
        for d in (p for p in entries if p.is_dir() and p != path):
            cfg = d / ah.CONFIG_FILE
            if cfg.is_file() and cfg.stat().st_size <= MAX_CONFIG_BYTES:
                try:
                    if json.loads(cfg.read_bytes()).get("name") == adapter:
                        return d
                except (ValueError, AttributeError):
                    continue
    raise InvalidArtifact(
        "adapterhub-fusion",
        f"no save_adapter directory named {adapter!r} beside or inside {path}; pass constituents="
        f"{{{adapter!r}: <directory or registry ref>}} (CLI: --constituent {adapter}=REF)",
    )


def publish_fusion(
    registry: Any,
    path: Path | str,
    name: str,
    constituents: dict[str, str] | None = None,
    **publish_kwargs: Any,
) -> Any:
    """Publish an AdapterHub fusion directory and its constituents; return the fusion's Version.

    `constituents` maps an adapter name to a registry ref or a directory; the others are
    found beside or inside `path` by the name in their adapter_config.json and published
    as `<name>-<adapter>`.
    """
    from deltahub import artifact as af

    path = Path(path)
    ah.refuse_pickles(path)
    data = read_json_file(path / ah.FUSION_CONFIG, MAX_CONFIG_BYTES, "config-json")
    names = data.get("adapter_names") or str(data.get("name", "")).split(",")
    if not names or not all(isinstance(n, str) and n for n in names):
        raise InvalidArtifact("config-schema", f"{ah.FUSION_CONFIG} names no adapters")
    given = dict(constituents or {})
    # convert (and check) everything before publishing anything
    sources: list[tuple[str, Any]] = []
    for n in names:
        where = given.get(n)
        if where is not None and not Path(where).is_dir():
            sources.append((n, registry.resolve(where)))
            continue
        sources.append((n, af.load_dir(Path(where) if where else _find_constituent(path, n))))
    cfgs = [registry.open(s).config if not isinstance(s, af.Artifact) else s.config for _, s in sources]
    config, tensors, original = convert_fusion(path, names, cfgs)
    pinned = []
    for n, s in sources:
        version = registry.publish(s, f"{name}-{n}") if isinstance(s, af.Artifact) else s
        pinned.append({"name": n, "ref": version.ref, "digest": version.digest})
    tmp = Path(tempfile.mkdtemp(prefix="deltahub-adapterhub-fusion-"))
    try:
        write(tmp / af.WEIGHTS_FILE, tensors)
        (tmp / af.CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        extra = {
            "fusion": {"constituents": pinned},
            "imported_from": {
                "format": "adapterhub",
                "name": original.get("name"),
                "config": original["config"],
            },
        }
        parents = [af.Parent(ref=p["ref"], digest=p["digest"], role=CONSTITUENT_ROLE) for p in pinned]
        return registry.publish(
            af.load_dir(tmp),
            name,
            parents=parents,
            extra={**extra, **(publish_kwargs.pop("extra", None) or {})},
            **publish_kwargs,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
