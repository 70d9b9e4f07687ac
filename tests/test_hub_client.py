"""The hub client never sends a token over plain http to another machine."""

from __future__ import annotations

import pytest

from deltahub.errors import AuthError
from deltahub.hub.client import INSECURE_ENV, HubClient
from deltahub.hub.remotes import is_loopback


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "localhost"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["10.0.0.1", "192.168.1.1", "8.8.8.8", "no-such-host.invalid"])
def test_other_hosts(host: str) -> None:
    assert not is_loopback(host)


def test_token_over_plain_http_to_another_host_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(INSECURE_ENV, raising=False)
    with pytest.raises(AuthError, match=r"plain http to 10\.0\.0\.1"):
        HubClient("http://10.0.0.1:8600", "dh_secret")
    HubClient("http://10.0.0.1:8600").close()  # no token: nothing to leak
    HubClient("https://hub.example.com", "dh_secret").close()
    HubClient("http://127.0.0.1:8600", "dh_secret").close()
    monkeypatch.setenv(INSECURE_ENV, "1")
    HubClient("http://10.0.0.1:8600", "dh_secret").close()
