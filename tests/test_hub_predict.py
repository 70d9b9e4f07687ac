"""`deltahub serve --predict-base`: POST /v1/predict answers as `deltahub run --json` does,
with the base loaded once; read tokens as for pulls; `/health` answers without a token."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from deltahub import Registry
from deltahub.hub.server import ServerThread
from deltahub.hub.tokens import TokenStore
from deltahub.training import train
from deltahub.training.inference import load, predict
from tests import fusion_helpers as fh

TEXTS = ["the red cat", "a very big blue dog saw one small owl", "gold"]


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("predict")
    base = fh.bert_dir(root / "bert")
    home = root / "home"
    data = fh.color_task(root / "color.jsonl", n=16)
    with Registry(home) as registry:
        for seed in (0, 1):
            train(
                str(base), str(data), name="team/color", r=4, target_modules=["query", "value"],
                registry=registry, epochs=1, batch_size=8, progress=False, seed=seed,
            )  # fmt: skip
    return home, base


def test_predict_route_matches_the_library_and_needs_a_read_token(hub_home) -> None:
    home, base = hub_home
    read, _ = TokenStore(home).create("read", None, None, "predict")
    other_ns, _ = TokenStore(home).create("read", "other", None, "elsewhere")
    with ServerThread(home, predict_base=str(base), predict_options={"device": "cpu"}) as server:
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["predict"]
        body = {"adapters": ["team/color@1"], "inputs": TEXTS}
        assert httpx.post(f"{server.url}/v1/predict", json=body).status_code == 401
        denied = httpx.post(
            f"{server.url}/v1/predict", json=body, headers={"Authorization": f"Bearer {other_ns}"}
        )
        assert denied.status_code == 403
        auth = {"Authorization": f"Bearer {read}"}
        answer = httpx.post(f"{server.url}/v1/predict", json=body, headers=auth, timeout=60)
        assert answer.status_code == 200, answer.text
        got = answer.json()["predictions"]
        loaded = load(str(base), ["team/color@1"], registry=Registry(home))
        want = predict(loaded.model, loaded.tokenizer, TEXTS, head_ref="team/color@1")
        assert [g["label"] for g in got] == [w["label"] for w in want]
        for g, w in zip(got, want, strict=True):
            assert g["logits"] == pytest.approx(w["logits"], abs=1e-6)
        # two versions of one adapter in one request, and back to one: no name clash
        both = {"adapters": ["team/color@1", "team/color@2"], "inputs": TEXTS[:1], "mode": "average"}
        assert httpx.post(f"{server.url}/v1/predict", json=both, headers=auth, timeout=60).status_code == 200
        again = httpx.post(f"{server.url}/v1/predict", json=body, headers=auth, timeout=60).json()
        assert [a["label"] for a in again["predictions"]] == [w["label"] for w in want]
        bad = httpx.post(f"{server.url}/v1/predict", json={**body, "inputs": [""]}, headers=auth)
        assert bad.status_code == 400 and "empty" in bad.json()["message"]


def test_without_predict_base_there_is_no_predict_route_but_health(hub_home) -> None:
    home, _ = hub_home
    with ServerThread(home) as server:
        assert httpx.get(f"{server.url}/health").json()["predict"] is False
        assert httpx.post(f"{server.url}/v1/predict", json={}).status_code in (404, 405)
