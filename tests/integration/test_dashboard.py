"""The dashboard's data in-process against a real Redis: the last-hour sampler, the summary and history
routes, tenant scoping, and the page's assets (shipped in the package, nothing from another origin)."""

from __future__ import annotations

import re
import time
import tomllib
from pathlib import Path

import redis
from fastapi.testclient import TestClient

from api.app import create_app
from api.history import WINDOW_S, History
from queueformer.contract.registry import ModelEntry
from queueformer.server import keys
from queueformer.server.overlay import ModelOverlay
from queueformer.server.tenants import ApiKeys
from tests.helpers import eventually, jsonl, make_settings

ROOT = Path(__file__).resolve().parents[2]


def test_sampler_keeps_one_hour_and_one_replica_samples_per_interval(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    a, b = History(r, 5.0), History(r, 5.0)
    now = float(r.time()[0])
    stale = now - WINDOW_S - 30
    r.zadd(keys.queue_depth_series("echo"), {f"{int(stale * 1000)}:9": stale})
    r.rpush("echo", "m1", "m2")
    r.hincrby(keys.GENERATED_TOKENS, "tiny-gpt2", 40)
    assert a.sample(["echo", "tiny-gpt2"]) is True
    assert b.sample(["echo", "tiny-gpt2"]) is False  # the other replica's sample stands for this interval
    depths = a.queue_depths(["echo", "tiny-gpt2"], now - 2 * WINDOW_S)
    assert [v for _, v in depths["echo"]] == [2.0]  # the sample older than an hour was trimmed
    assert [v for _, v in depths["tiny-gpt2"]] == [0.0]
    assert 0 < r.ttl(keys.tokens_series("tiny-gpt2")) <= WINDOW_S + 60


def test_token_rates_come_from_the_workers_cumulative_count(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    history = History(r, 0.2)
    r.hincrby(keys.GENERATED_TOKENS, "tiny-gpt2", 100)
    assert history.sample(["tiny-gpt2"])
    time.sleep(0.5)
    r.hincrby(keys.GENERATED_TOKENS, "tiny-gpt2", 50)
    assert history.sample(["tiny-gpt2"])
    (point,) = history.token_rates(["tiny-gpt2"], 0)["tiny-gpt2"]
    assert 50 / 0.8 < point[1] < 50 / 0.45  # 50 new tokens over about half a second


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_summary_and_history_are_scoped_to_the_tenant_except_queues(redis_url: str, tmp_path: Path) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    api_keys = ApiKeys(r)
    acme, globex = api_keys.create("acme"), api_keys.create("globex")
    settings = make_settings(redis_url, tmp_path, api={"auth_required": True, "history_interval_s": 0.2})
    ft = ModelEntry(
        name="ft:tiny-gpt2:acme:abc123",
        task="generate",
        path=f"{settings.resolved_storage_url}/models/ftm-0123456789abcdef",
        base_model="tiny-gpt2",
        queue="fine-tuned",
        tenant="acme",
    )
    ModelOverlay(r).add(ft)
    r.hincrby(keys.GENERATED_TOKENS, ft.name, 10)
    with TestClient(create_app(settings)) as c:
        assert c.get("/v1/dashboard").status_code == 401
        assert c.get("/v1/dashboard/history", headers=_auth("wrong")).status_code == 401
        line = {"custom_id": "a", "method": "POST", "url": "/v1/jobs", "body": {"task": "echo", "model": "echo"}}
        fid = c.post(
            "/v1/files", files={"file": ("in.jsonl", jsonl([line]))}, data={"purpose": "batch"}, headers=_auth(acme)
        ).json()["id"]
        batch = c.post(
            "/v1/batches",
            json={"input_file_id": fid, "endpoint": "/v1/jobs", "completion_window": "24h"},
            headers=_auth(acme),
        ).json()
        assert batch["status"] == "in_progress"  # no worker here: its chunk waits in the echo queue
        r.hincrby(keys.GENERATED_TOKENS, ft.name, 30)

        mine = c.get("/v1/dashboard", headers=_auth(acme)).json()
        theirs = c.get("/v1/dashboard", headers=_auth(globex)).json()
        assert mine["tenant"] == "acme" and theirs["tenant"] == "globex"
        assert mine["batches"] == {"open": 1, "by_status": {"in_progress": 1}}
        assert theirs["batches"] == {"open": 0, "by_status": {}}
        assert ft.name in [m["model"] for m in mine["models"]]
        assert ft.name not in [m["model"] for m in theirs["models"]]
        # Queue depths are the cluster's: both tenants see acme's waiting chunk.
        for summary in (mine, theirs):
            assert {q["queue"]: q["depth"] for q in summary["queues"]}["echo"] == 1

        def sampled() -> dict[str, object] | None:
            h = c.get("/v1/dashboard/history?minutes=5", headers=_auth(acme)).json()
            return h if any(v == 1 for _, v in h["queue_depth"]["echo"]) and h["tokens_per_s"][ft.name] else None

        mine_h = eventually(sampled, timeout=10)
        theirs_h = c.get("/v1/dashboard/history", headers=_auth(globex)).json()
        assert ft.name not in theirs_h["tokens_per_s"] and "tiny-gpt2" in theirs_h["tokens_per_s"]
        assert any(v == 1 for _, v in theirs_h["queue_depth"]["echo"])
        assert mine_h["since"] < mine_h["time"] and mine_h["interval_s"] == 0.2
        assert c.get("/v1/dashboard/history?minutes=61", headers=_auth(acme)).status_code == 422


def test_page_and_assets_are_served_from_the_package_without_auth(redis_url: str, tmp_path: Path) -> None:
    settings = make_settings(redis_url, tmp_path, api={"auth_required": True})
    with TestClient(create_app(settings)) as c:
        moved = c.get("/ui", follow_redirects=False)
        assert moved.status_code == 307 and moved.headers["location"] == "ui/"
        page = c.get("/ui/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp
        for src in re.findall(r'(?:src|href)="([^"]+)"', page.text):
            asset = c.get(f"/ui/{src}")
            assert asset.status_code == 200 and asset.content, src
        assert c.get("/ui/dashboard.js").headers["content-type"].startswith("text/javascript")
        assert c.get("/ui/app.py").status_code == 404
        assert c.get("/ui/..%2Fapp.py").status_code == 404
        assert "/ui/" not in c.get("/openapi.json").text  # the page is not part of the API contract


def test_dashboard_assets_ship_in_the_package_and_load_nothing_from_elsewhere() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["api"]
    assert "ui/*" in data
    files = sorted((ROOT / "api" / "ui").iterdir())
    assert {f.name for f in files} >= {"index.html", "dashboard.js", "dashboard.css"}
    for f in files:
        text = f.read_text()
        # The only absolute URL allowed is the SVG namespace (an identifier, never fetched).
        urls = set(re.findall(r"https?://[^\s\"')]+", text)) - {"http://www.w3.org/2000/svg"}
        assert urls == set(), (f.name, urls)
