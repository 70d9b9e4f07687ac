"""The adapter artifact: its files, and loading one with strict validation.

An adapter version is a directory of three files:

    adapter_model.safetensors   the weights (safetensors only; pickle is never loaded)
    adapter_config.json         PEFT's config (LoRA, IA3, prompts), or {"method": ..., ...}
    deltahub.json               the manifest (`Manifest`, in `deltahub.manifest`)

A PEFT directory (no deltahub.json) is a valid input; its manifest is built from its
config at publish time. The files' bytes are checked in `deltahub.fileformat` (safetensors
header, strict JSON, no pickle); the config is checked by its method's schema, which this
module asks the method registry for (`deltahub.methods.get_schema`), never importing a
method itself.

Nothing here imports torch: the registry validates artifacts without model code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltahub.errors import InvalidArtifact
from deltahub.fileformat import (
    DTYPE_BYTES,
    PICKLE_MAGIC,
    PICKLE_SUFFIXES,
    TASK_HEAD_PREFIX,
    TENSOR_NAME_RE,
    TensorInfo,
    check_not_pickle,
    check_tensor_name,
    read_json_file,
    read_safetensors_header,
    short,
)
from deltahub.manifest import Manifest, Parent, utc_now
from deltahub.methods.registry import ConfigCheck, get_schema, register_method
from deltahub.patterns import lora_scaling, pattern_value
from deltahub.settings import MAX_CONFIG_BYTES, MAX_MANIFEST_BYTES

__all__ = [
    "ADAPTER_NAME_RE",
    "CONFIG_FILE",
    "DTYPE_BYTES",
    "KNOWN_FILES",
    "MANIFEST_FILE",
    "MAX_CONFIG_BYTES",
    "MAX_MANIFEST_BYTES",
    "PICKLE_MAGIC",
    "PICKLE_SUFFIXES",
    "README_FILE",
    "REQUIRED_FILES",
    "TASK_HEAD_PREFIX",
    "TENSOR_NAME_RE",
    "WEIGHTS_FILE",
    "Artifact",
    "ConfigCheck",
    "Manifest",
    "Parent",
    "TensorInfo",
    "artifact_digest",
    "check_not_pickle",
    "check_tensor_name",
    "load_dir",
    "load_files",
    "lora_scaling",
    "method_of",
    "pattern_value",
    "read_json_file",
    "read_safetensors_header",
    "register_config_checker",
    "utc_now",
    "validate",
    "write_dir",
]

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
MANIFEST_FILE = "deltahub.json"
README_FILE = "README.md"
REQUIRED_FILES = (WEIGHTS_FILE, CONFIG_FILE)
KNOWN_FILES = (WEIGHTS_FILE, CONFIG_FILE, MANIFEST_FILE, README_FILE)

ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def method_of(config: dict[str, Any]) -> str:
    """The deltahub method name of a config: PEFT's `peft_type` lower-cased, or `method`."""
    if "peft_type" in config:
        peft_type = config["peft_type"]
        if not isinstance(peft_type, str):
            raise InvalidArtifact("config-schema", "peft_type must be a string")
        return peft_type.lower()
    method = config.get("method")
    if not isinstance(method, str) or not method:
        raise InvalidArtifact(
            "config-schema", f"{CONFIG_FILE} needs a 'peft_type' (PEFT) or a 'method' (deltahub) field"
        )
    return method


def register_config_checker(method: str, checker: ConfigCheck) -> None:
    """Register the schema/shape check for one method's adapter_config.json (a method
    without a runtime; a full method registers with `deltahub.methods.register_method`)."""
    register_method(method, schema=checker)


def validate(config: dict[str, Any], tensors: dict[str, TensorInfo]) -> str:
    """Check a config against its method's schema and the tensor shapes; return the method."""
    method = method_of(config)
    check = get_schema(method)
    try:
        check(config, tensors)
    except InvalidArtifact:
        raise
    except (TypeError, ValueError, ArithmeticError, LookupError, AttributeError, RecursionError) as e:
        # A schema that did not foresee a value (a third-party one, say) still answers with
        # the rule, never a traceback: the config is what is malformed.
        raise InvalidArtifact(
            "config-schema", f"{method} config is malformed ({type(e).__name__}: {short(str(e), 200)})"
        ) from None
    return method


# --------------------------------------------------------------------------- artifact


@dataclass
class Artifact:
    """A validated artifact: where its files are, its parsed config, manifest and header.

    `files` maps the artifact file name to where its bytes live (a directory entry, or a
    registry blob). `manifest` is None for a PEFT directory that has no deltahub.json.
    """

    files: dict[str, Path]
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    manifest: Manifest | None = None

    @property
    def method(self) -> str:
        return method_of(self.config)

    @property
    def weights_path(self) -> Path:
        return self.files[WEIGHTS_FILE]


def load_files(files: dict[str, Path]) -> Artifact:
    """Validate an artifact given as {artifact file name: path of its bytes}."""
    for name in REQUIRED_FILES:
        if name not in files:
            raise InvalidArtifact("missing-file", f"the artifact has no {name}")
    for name, path in files.items():
        if name not in KNOWN_FILES:
            raise InvalidArtifact(
                "unknown-file", f"{name!r} is not an artifact file ({', '.join(KNOWN_FILES)})"
            )
        if name != WEIGHTS_FILE:
            check_not_pickle(path)
    tensors = read_safetensors_header(files[WEIGHTS_FILE])
    config = read_json_file(files[CONFIG_FILE], MAX_CONFIG_BYTES, "config-json")
    method = validate(config, tensors)
    manifest = None
    if MANIFEST_FILE in files:
        manifest = Manifest.from_dict(
            read_json_file(files[MANIFEST_FILE], MAX_MANIFEST_BYTES, "manifest-json")
        )
        if manifest.method != method:
            raise InvalidArtifact(
                "manifest-schema", f"manifest says method {manifest.method!r}, config says {method!r}"
            )
    return Artifact(files=dict(files), config=config, tensors=tensors, manifest=manifest)


def load_dir(path: Path | str) -> Artifact:
    """Validate an artifact directory (ours, PEFT's, or AdapterHub's, converted) and return it.

    Pickle files anywhere in the directory are refused; other unknown files (a PEFT
    directory's tokenizer files, say) are ignored and not published.
    """
    path = Path(path)
    if not path.is_dir():
        raise InvalidArtifact("not-a-directory", f"{path} is not a directory")
    from deltahub.interop import adapterhub  # AdapterHub saves are converted, exactly or refused

    if adapterhub.is_adapterhub_dir(path):
        return _load_converted(adapterhub.convert_dir(path))
    files: dict[str, Path] = {}
    for entry in sorted(path.iterdir()):
        if entry.suffix.lower() in PICKLE_SUFFIXES:
            check_not_pickle(entry)
        if entry.name in KNOWN_FILES:
            if not entry.is_file() or entry.is_symlink():
                raise InvalidArtifact("not-a-file", f"{entry} must be a regular file, not a link or folder")
            files[entry.name] = entry
    return load_files(files)


def _load_converted(tmp: Path) -> Artifact:
    """The artifact a converter wrote to the temporary directory `tmp`, which is removed
    when the returned object is garbage-collected (or at once if it does not validate)."""
    import shutil
    import weakref

    try:
        artifact = load_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    weakref.finalize(artifact, shutil.rmtree, str(tmp), True)
    return artifact


def write_dir(
    path: Path | str,
    tensors: dict[str, Any],
    config: dict[str, Any],
    manifest: Manifest | None = None,
) -> Path:
    """Write an artifact directory from torch tensors (contiguous, CPU) and JSON objects.

    A PEFT-format config without `base_model_name_or_path` gets the manifest's base model
    (a portable id), so `PeftModel`/`AutoPeftModel` users see which base it is for.
    """
    from safetensors.torch import save_file

    if (
        manifest is not None
        and manifest.base_model
        and "peft_type" in config
        and not config.get("base_model_name_or_path")
    ):
        config = {**config, "base_model_name_or_path": manifest.base_model}

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name in tensors:
        check_tensor_name(name)
    save_file(
        {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
        str(path / WEIGHTS_FILE),
    )
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if manifest is not None:
        (path / MANIFEST_FILE).write_bytes(manifest.to_json())
    return path


def artifact_digest(file_digests: dict[str, str]) -> str:
    """The digest of a version: sha256 of the canonical JSON of {file name: blob digest}.

    It covers the manifest too, so it pins one exact published version; the same files
    always give the same digest.
    """
    import hashlib

    canonical = json.dumps(
        {"files": dict(sorted(file_digests.items()))}, sort_keys=True, separators=(",", ":")
    )
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


_MOVED = {
    "check_lora_config": ("deltahub.methods.lora.schema", "check_config"),
    "module_of": ("deltahub.methods.lora.schema", "module_of"),
}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module 'deltahub.artifact' has no attribute {name!r}")
    import importlib
    import warnings

    module, attr = _MOVED[name]
    warnings.warn(f"deltahub.artifact.{name} moved to {module}.{attr}", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(module), attr)
