"""`serve --predict-base` on both back-ends: POST /v1/predict answers from an adapter pushed
to the hub, on the embedded store and on PostgreSQL + S3 (blobs copied into a local cache
by digest, hash-checked: deltahub/hub/predict.py `StoreRegistry`). The answer is compared
with the library's prediction from the client's own registry (an independent load)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from deltahub import Registry
from deltahub.hub.client import HubClient, push
from deltahub.training import train
from deltahub.training.inference import load, predict
from tests import fusion_helpers as fh
from tests.hub_helpers import BACKENDS, Hub, start_hub

TEXTS = ["the red cat", "a very big blue dog saw one small owl", "gold"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("predict-team")
    base = fh.bert_dir(root / "bert")
    home = root / "client"
    data = fh.color_task(root / "color.jsonl", n=16)
    with Registry(home) as registry:
        train(
            str(base), str(data), name="team/color", r=4, target_modules=["query", "value"],
            registry=registry, epochs=1, batch_size=8, progress=False, seed=0,
        )  # fmt: skip
    return home, base


@pytest.fixture(params=BACKENDS)
def hub(request: pytest.FixtureRequest, tmp_path: Path, trained: tuple[Path, Path]) -> Iterator[Hub]:
    _, base = trained
    yield from start_hub(tmp_path, request.param, predict_base=str(base), predict_options={"device": "cpu"})


def test_predict_answers_from_a_pushed_adapter_on_either_back_end(
    hub: Hub, trained: tuple[Path, Path]
) -> None:
    home, base = trained
    local = Registry(home)
    push("team/color", HubClient(hub.url, hub.tokens["admin"]), local)
    body = {"adapters": ["team/color@1"], "inputs": TEXTS}
    assert httpx.post(f"{hub.url}/v1/predict", json=body, timeout=30).status_code == 401
    auth = {"Authorization": f"Bearer {hub.tokens['read']}"}
    answer = httpx.post(f"{hub.url}/v1/predict", json=body, headers=auth, timeout=120)
    assert answer.status_code == 200, answer.text
    got = answer.json()["predictions"]
    loaded = load(str(base), ["team/color@1"], registry=local)
    want = predict(loaded.model, loaded.tokenizer, TEXTS, head_ref="team/color@1")
    assert [g["label"] for g in got] == [w["label"] for w in want]
    for g, w in zip(got, want, strict=True):
        assert g["logits"] == pytest.approx(w["logits"], abs=1e-6)
    # again: the adapter stays resident, the answer is the same
    again = httpx.post(f"{hub.url}/v1/predict", json=body, headers=auth, timeout=120).json()
    assert [a["logits"] for a in again["predictions"]] == [g["logits"] for g in got]
    missing = httpx.post(
        f"{hub.url}/v1/predict", json={**body, "adapters": ["team/color@9"]}, headers=auth, timeout=30
    )
    assert missing.status_code == 404, missing.text
    if hub.backend != "embedded":  # the blobs came through the cache, by digest
        cache = hub.home / "predict-cache" / "blobs" / "sha256"
        v = local.resolve("team/color@1")
        for digest in v.files.values():
            hexd = digest.split(":", 1)[1]
            assert (cache / hexd[:2] / hexd).read_bytes() == local.store.path(digest).read_bytes()
