"""`deltahub export REF DIR --target vllm|lorax|peft [--convert --rank R --base BASE]`.

Without `--convert`: the version's files, byte-identical, if the target would load them;
otherwise `Unsupported` naming every rule broken (and whether `--convert` removes them).
With `--convert`: a plain PEFT LoRA at rank R (`deltahub.serving.convert`), checked
against the target again, its manifest pinning the source by digest
(`parents: [{role: "converted-from"}]`) and recording the error the conversion introduced
(`extra.conversion`: per module and on a probe batch's logits).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from deltahub import artifact as af
from deltahub.errors import AlreadyExists, InvalidConfig, Unsupported
from deltahub.serving.rules import VLLM_MAX_LORA_RANKS, Servability, check_servable, lora_modules, max_rank


def _refusal(report: Servability) -> Unsupported:
    rules = "; ".join(
        f"{f.rule}: {f.message}" + (f" (fix: {f.fix})" if f.fix else "") for f in report.refusals
    )
    return Unsupported(f"{report.target} would refuse {report.ref}: {rules}")


def _fresh(directory: Path) -> None:
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise AlreadyExists(f"{directory} exists and is not an empty directory; choose a new path")


def export_for_target(
    ref: str,
    directory: str | Path,
    target: str = "vllm",
    *,
    convert: bool = False,
    rank: int | None = None,
    base: Any = None,
    registry: Any = None,
    probe: Any = None,
) -> dict[str, Any]:
    """Write `ref` as a directory `target` loads (see the module docstring); return the report."""
    from deltahub.registry import Registry

    reg = registry or Registry()
    v = reg.resolve(ref)
    art = reg.open(v)
    out = Path(directory)
    report = check_servable(art, target, ref=v.ref, digest=v.digest)
    if not convert:
        if not report.ok:
            raise _refusal(report)
        reg.export(f"{v.full_name}@{v.digest}", out)
        return {"path": str(out), "check": report.to_dict()}
    fixed = [f for f in report.refusals if not f.convertible]
    if fixed:
        report.refusals = fixed
        raise _refusal(report)
    if base is None:
        raise InvalidConfig(
            "--convert needs --base (the base model: DoRA and IA3 updates depend on its weights)"
        )
    if rank is None:
        rank = min(max_rank(art.config, list(lora_modules(art.tensors))) or 16, VLLM_MAX_LORA_RANKS[-1])
    _fresh(out)
    import torch

    from deltahub.compose import load_base
    from deltahub.serving.convert import convert as to_lora
    from deltahub.serving.convert import measure_logits

    model = load_base(base, dtype=torch.float32) if not isinstance(base, torch.nn.Module) else base
    conv = to_lora(art, rank, model)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    af.write_dir(tmp, conv.tensors, conv.config)
    conv.logits_rel_error, conv.logits_max_abs = measure_logits(
        model, tmp, original=f"{v.full_name}@{v.digest}", registry=reg, ids=probe
    )
    src = art.manifest
    manifest = af.Manifest(
        name=v.name,
        method="lora",
        base_model=(src.base_model if src else None) or conv.config.get("base_model_name_or_path"),
        base_fingerprint=src.base_fingerprint if src else None,
        task=src.task if src else None,
        description=src.description if src else "",
        license=src.license if src else None,
        parents=[af.Parent(v.ref, v.digest, "converted-from")],
        extra={"conversion": conv.report()},
    )
    (tmp / af.MANIFEST_FILE).write_bytes(manifest.to_json())
    after = check_servable(af.load_dir(tmp), target, ref=v.ref, digest=v.digest)
    if not after.ok:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _refusal(after)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return {
        "path": str(out),
        "check": after.to_dict(),
        "conversion": conv.report(),
        "source": report.to_dict(),
    }


__all__ = ["export_for_target"]
