"""Named remotes and their tokens, kept in the registry home.

    <home>/remotes.json       {"remotes": {"origin": {"url": "https://hub.example.com"}}}
    <home>/credentials.json   {"origin": "dh_..."}   mode 0600, written atomically

`DELTAHUB_TOKEN` overrides the stored token (CI jobs, one-off commands). Both files are
replaced whole with `os.replace`, so a reader never sees half a file.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from deltahub.errors import AlreadyExists, InvalidConfig, NotFound
from deltahub.settings import TOKEN_ENV, default_home

REMOTE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
DEFAULT_REMOTE = "origin"


@dataclass(frozen=True)
class Remote:
    name: str
    url: str
    token: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.url, "logged_in": self.token is not None}


def _home(home: Path | str | None) -> Path:
    return Path(home) if home is not None else default_home()


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidConfig(f"{path} is not valid JSON ({e}); fix or delete it") from None
    if not isinstance(data, dict):
        raise InvalidConfig(f"{path} must hold a JSON object; fix or delete it")
    return data


def _write(path: Path, data: dict[str, Any], mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)  # before any byte is written: a token never sits in a readable file
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_remote_name(name: str) -> str:
    if not isinstance(name, str) or not REMOTE_NAME_RE.match(name):
        raise InvalidConfig(f"remote name {name!r} must be letters, digits, '_', '.', '-'")
    return name


def is_loopback(host: str) -> bool:
    """True if every address `host` resolves to is a loopback address."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidConfig(f"{url!r} is not an http(s) URL (e.g. https://hub.example.com)")
    return url.rstrip("/")


def add_remote(name: str, url: str, home: Path | str | None = None, *, replace: bool = False) -> Remote:
    path = _home(home) / "remotes.json"
    data = _read(path)
    remotes = data.setdefault("remotes", {})
    if name in remotes and not replace:
        raise AlreadyExists(f"remote {name!r} exists ({remotes[name]['url']}); remove it first")
    remotes[check_remote_name(name)] = {"url": check_url(url)}
    _write(path, data)
    return Remote(name, remotes[name]["url"])


def remove_remote(name: str, home: Path | str | None = None) -> None:
    h = _home(home)
    data = _read(h / "remotes.json")
    if name not in data.get("remotes", {}):
        raise NotFound(f"no remote named {name!r} (see `deltahub remote list`)")
    del data["remotes"][name]
    _write(h / "remotes.json", data)
    creds = _read(h / "credentials.json")
    if creds.pop(name, None) is not None:
        _write(h / "credentials.json", creds, 0o600)


def list_remotes(home: Path | str | None = None) -> list[Remote]:
    h = _home(home)
    creds = _read(h / "credentials.json")
    return [
        Remote(n, r["url"], creds.get(n))
        for n, r in sorted(_read(h / "remotes.json").get("remotes", {}).items())
    ]


def get_remote(name: str | None = None, home: Path | str | None = None) -> Remote:
    """The remote `name`; without a name, `origin` or else the only remote there is.

    The token is `$DELTAHUB_TOKEN` if set, else the one `deltahub login` stored.
    """
    remotes = {r.name: r for r in list_remotes(home)}
    if name is None:
        if DEFAULT_REMOTE in remotes:
            name = DEFAULT_REMOTE
        elif len(remotes) == 1:
            name = next(iter(remotes))
        else:
            what = "no remotes are configured" if not remotes else f"remotes: {', '.join(sorted(remotes))}"
            raise NotFound(
                f"name a remote with --remote ({what}; add one with `deltahub remote add NAME URL`)"
            )
    if name not in remotes:
        raise NotFound(f"no remote named {name!r} (add it with `deltahub remote add {name} URL`)")
    remote = remotes[name]
    env = os.environ.get(TOKEN_ENV)
    return Remote(remote.name, remote.url, env or remote.token)


def save_token(name: str, token: str, home: Path | str | None = None) -> Path:
    """Store `token` for remote `name` in `<home>/credentials.json` (mode 0600)."""
    h = _home(home)
    if name not in _read(h / "remotes.json").get("remotes", {}):
        raise NotFound(f"no remote named {name!r} (add it with `deltahub remote add {name} URL`)")
    token = token.strip()
    if not token:
        raise InvalidConfig("the token is empty")
    creds = _read(h / "credentials.json")
    creds[name] = token
    _write(h / "credentials.json", creds, 0o600)
    return h / "credentials.json"


def forget_token(name: str, home: Path | str | None = None) -> bool:
    """Remove the stored token of remote `name`; False if none was stored."""
    h = _home(home)
    creds = _read(h / "credentials.json")
    if name not in creds:
        return False
    del creds[name]
    _write(h / "credentials.json", creds, 0o600)
    return True
