"""A hub server process for the durable-webhook tests, with short webhook timings.

    python -m tests.hub_webhook_server '{"home": ..., "db": null | "postgresql://...",
                                         "port": 8600, "webhooks": {"base_delay": 0.2, ...}}'

`deltahub serve` with the same stores, except that the dispatcher's attempts, back-off,
timeout, lease and poll interval come from "webhooks" (the tests cannot wait for the
production defaults). Tests start it as a subprocess and stop it by pid (SIGKILL too).
"""

from __future__ import annotations

import json
import sys

import uvicorn

from deltahub.hub.server import create_app, uvicorn_config


def main() -> None:
    cfg = json.loads(sys.argv[1])
    app = create_app(cfg["home"], db=cfg.get("db"))
    dispatcher = app.state.hub.webhooks
    for key, value in cfg.get("webhooks", {}).items():
        if not hasattr(dispatcher, key):
            raise SystemExit(f"the dispatcher has no setting {key!r}")
        setattr(dispatcher, key, value)
    config = uvicorn_config(app, host="127.0.0.1", port=int(cfg["port"]), log_level="warning")
    try:
        uvicorn.Server(config).run()
    finally:
        app.state.hub.close()


if __name__ == "__main__":
    main()
