"""`deltahub doctor`: what this machine has (versions, accelerator, home, remotes), for bug reports."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

import click

from deltahub.cli.output import handle_errors, json_option, print_json

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "safetensors", "huggingface_hub", "accelerate")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _accelerator() -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"cuda": False, "devices": [], "mps": False}
    cuda = torch.cuda.is_available()
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return {"cuda": cuda, "cuda_version": torch.version.cuda, "devices": devices, "mps": mps}


def _home() -> dict[str, Any]:
    from deltahub.settings import default_home

    home = default_home()
    probe = home if home.exists() else next((p for p in home.parents if p.exists()), home)
    info: dict[str, Any] = {
        "path": str(home),
        "exists": home.exists(),
        "writable": os.access(probe, os.W_OK),
        "versions": None,
    }
    if home.exists() and (home / "registry.db").exists():
        try:
            from deltahub.registry import Registry

            with Registry(home) as registry:
                info["versions"] = registry.db.execute("select count(*) from versions").fetchone()[0]
        except Exception as e:  # a broken home is what doctor is for: report it, do not fail
            info["problem"] = f"{type(e).__name__}: {e}"
    return info


def diagnose() -> dict[str, Any]:
    """Everything `doctor` reports, as a dict."""
    from deltahub import __version__
    from deltahub.hub.remotes import list_remotes
    from deltahub.settings import TOKEN_ENV

    home = _home()
    try:
        remotes = [r.to_dict() for r in list_remotes()] if home["exists"] else []
    except Exception as e:
        remotes = [{"problem": f"{type(e).__name__}: {e}"}]
    return {
        "deltahub": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in PACKAGES},
        "accelerator": _accelerator(),
        "home": home,
        "remotes": remotes,
        "env": {k: bool(os.environ.get(k)) for k in (TOKEN_ENV, "HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE")},
    }


def register(cli: click.Group) -> None:
    @cli.command("doctor")
    @json_option
    @handle_errors
    def doctor(as_json: bool) -> None:
        """Report versions (torch, transformers, peft, bitsandbytes, ...), CUDA, the home and
        whether it is writable, and the remotes: paste it into a bug report."""
        report = diagnose()
        if as_json:
            print_json(report)
            return
        click.echo(f"deltahub        {report['deltahub']} (python {report['python']}, {report['platform']})")
        for package, version in report["packages"].items():
            click.echo(f"{package:<16}{version or 'not installed'}")
        acc = report["accelerator"]
        cuda = f"yes, CUDA {acc.get('cuda_version')}: {', '.join(acc['devices'])}" if acc["cuda"] else "no"
        click.echo(f"{'cuda':<16}{cuda}{'  (mps available)' if acc.get('mps') else ''}")
        home = report["home"]
        state = "writable" if home["writable"] else "read-only (reads work, writes fail)"
        made = f"{home['versions']} versions" if home["versions"] is not None else "no registry yet"
        click.echo(f"{'home':<16}{home['path']} ({state}; {made})")
        if home.get("problem"):
            click.echo(f"{'problem':<16}{home['problem']}")
        for r in report["remotes"]:
            if "problem" in r:
                click.echo(f"{'remote':<16}{r['problem']}")
            else:
                click.echo(
                    f"{'remote':<16}{r['name']} {r['url']} ({'logged in' if r['logged_in'] else 'no token'})"
                )
        set_vars = [k for k, v in report["env"].items() if v]
        click.echo(
            f"{'environment':<16}{', '.join(set_vars) + ' set' if set_vars else 'no deltahub/HF variables set'}"
        )
