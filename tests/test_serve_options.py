"""`localsmall serve` options beyond the defaults: `--cors` for browser pages (a real
server on 127.0.0.1), and /health while the model is still loading."""

from __future__ import annotations

from collections.abc import Iterator

import httpx2
import pytest

from tests.conftest import TinyModels
from tests.serveprocess import ServerProcess, running_server

KEY = "cors-key-123"
ALLOWED = "http://app.example"


@pytest.fixture(scope="module")
def cors_server(tiny: TinyModels, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[ServerProcess]:
    args = ["--model", str(tiny.f16), "--no-vision", "--ctx", "2048", "--gpu-layers", "0",
            "--threads", "1", "--temperature", "0", "--cors", ALLOWED]
    with running_server(tmp_path_factory.mktemp("cors"), args, api_key=KEY) as running:
        yield running


def _preflight(server: ServerProcess, origin: str) -> httpx2.Response:
    return httpx2.options(f"{server.base_url}/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})


def test_cors_preflight_and_headers(cors_server: ServerProcess) -> None:
    server = cors_server
    # The preflight needs no key (browsers send none) and allows what a page sends.
    preflight = _preflight(server, ALLOWED)
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in preflight.headers["access-control-allow-methods"]
    allowed_headers = preflight.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed_headers and "content-type" in allowed_headers
    auth = {"Authorization": f"Bearer {KEY}", "Origin": ALLOWED}
    models = httpx2.get(f"{server.base_url}/models", headers=auth)
    assert models.status_code == 200
    assert models.headers["access-control-allow-origin"] == ALLOWED
    reply = httpx2.post(f"{server.base_url}/chat/completions", headers=auth, timeout=120,
                        json={"model": server.model_id(), "max_tokens": 2,
                              "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 200 and reply.json()["choices"]
    assert reply.headers["access-control-allow-origin"] == ALLOWED
    # A page can read why it was refused.
    refused = httpx2.get(f"{server.base_url}/models", headers={"Origin": ALLOWED})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == ALLOWED


def test_cors_refuses_other_origins(cors_server: ServerProcess) -> None:
    server = cors_server
    evil = "http://evil.example"
    assert "access-control-allow-origin" not in _preflight(server, evil).headers
    page = httpx2.get(f"{server.base_url}/models",
                      headers={"Authorization": f"Bearer {KEY}", "Origin": evil})
    assert page.status_code == 200 and "access-control-allow-origin" not in page.headers
