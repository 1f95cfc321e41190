"""The batch dashboard at /ui in headless Chromium, against a real cluster with auth on.

The cluster runs one worker for tiny-gpt2 and none for echo, so echo work waits in its queue: the
page must show that depth, the worker, a batch whose progress bar runs to 100 %, the error of its
failed line and both last-hour plots with samples in them. The API samples every second here.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from PIL import Image, ImageStat
from playwright.sync_api import expect

from queueformer.client import Client
from queueformer.server import keys
from queueformer.server.cluster import Cluster
from tests.conftest import free_port
from tests.helpers import jsonl, make_settings

KEY_SLOT = "queueformer.apiKey"
# Enough work (1,200 lines of 192 tokens) that a fast machine still shows the batch running for several of
# the page's 2 s polls: 240 lines of 96 tokens finished between two polls on a quiet machine.
LINES = 1200
TOKENS_PER_LINE = 192


@dataclass
class Site:
    url: str
    key: str
    redis_url: str

    def client(self) -> Client:
        return Client(self.url, api_key=self.key)


@pytest.fixture(scope="module")
def site(module_redis_url: str, tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    key = "qf-" + secrets.token_urlsafe(24)
    cluster = Cluster(
        make_settings(module_redis_url, tmp_path_factory.mktemp("dashboard"), tiny_models),
        api_port=free_port(),
        worker_groups=[["tiny-gpt2"]],  # nobody serves echo: its jobs stay queued
        worker_concurrency=2,
        env={
            "QUEUEFORMER_API__AUTH_REQUIRED": "true",
            "QUEUEFORMER_API__BOOTSTRAP_KEYS": json.dumps([f"acme:{key}"]),
            "QUEUEFORMER_API__HISTORY_INTERVAL_S": "1",
        },
    )
    with cluster.running(timeout=240):
        yield Site(cluster.api_url, key, cluster.redis_url)


def open_dashboard(page: Any, site: Site) -> Any:
    page.goto(f"{site.url}/ui")
    page.fill("#key-input", site.key)
    page.click("#key-submit")
    expect(page.locator("#dashboard")).to_be_visible()
    expect(page.locator("body")).to_have_attribute("data-ready", "1")
    return page


def stored_key(page: Any) -> str | None:
    value: str | None = page.evaluate(f"sessionStorage.getItem('{KEY_SLOT}')")
    return value


def test_page_asks_for_a_key_rejects_a_wrong_one_and_sends_the_right_one(page: Any, site: Site) -> None:
    requests: list[tuple[str, str | None]] = []
    page.on("request", lambda r: requests.append((r.url, r.headers.get("authorization"))))
    page.goto(f"{site.url}/ui")
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#dashboard")).to_be_hidden()
    expect(page.locator("#key-error")).to_be_hidden()  # asking is not an error

    page.fill("#key-input", "qf-not-a-key")
    page.click("#key-submit")
    expect(page.locator("#key-error")).to_contain_text("invalid API key")
    expect(page.locator("#dashboard")).to_be_hidden()
    assert stored_key(page) is None

    page.fill("#key-input", site.key)
    page.click("#key-submit")
    expect(page.locator("#dashboard")).to_be_visible()
    expect(page.locator("#tenant")).to_have_text("tenant: acme")
    expect(page.locator("body")).to_have_attribute("data-ready", "1")
    assert stored_key(page) == site.key

    page.reload()  # the key lives for the tab's session: no second prompt
    expect(page.locator("#dashboard")).to_be_visible()
    expect(page.locator("#login")).to_be_hidden()
    expect(page.locator("body")).to_have_attribute("data-ready", "1")

    page.click("#sign-out")
    expect(page.locator("#login")).to_be_visible()
    assert stored_key(page) is None

    # Nothing came from another origin, and every API call after sign-in carried the key.
    assert requests and all(url.startswith(site.url) for url, _ in requests)
    api_calls = [(url, auth) for url, auth in requests if "/v1/" in url]
    assert any(auth == f"Bearer {site.key}" for _, auth in api_calls)
    assert all(auth in (None, "Bearer qf-not-a-key", f"Bearer {site.key}") for _, auth in api_calls)


def test_a_running_batch_advances_to_100_percent_and_shows_its_failed_line(page: Any, site: Site) -> None:
    open_dashboard(page, site)
    r = redis.Redis.from_url(site.redis_url, decode_responses=True)
    before = int(r.hget(keys.GENERATED_TOKENS, "tiny-gpt2") or 0)
    lines = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/jobs",
            "body": {
                "task": "generate",
                "model": "tiny-gpt2",
                "prompt": f"Report {i}: the weather today",
                "max_new_tokens": TOKENS_PER_LINE,
                "ignore_eos": True,
            },
        }
        for i in range(LINES)
    ]
    bad = {"task": "generate", "model": "no-such-model", "prompt": "x"}
    lines.insert(7, {"custom_id": "broken-line", "method": "POST", "url": "/v1/jobs", "body": bad})
    with site.client() as qf:
        batch = qf.create_batch(qf.upload(jsonl(lines))["id"], "/v1/jobs")

    row = page.locator(f'#batches tr[data-batch-id="{batch["id"]}"]')
    bar = row.locator("[role=progressbar]")
    seen: list[tuple[int, str]] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        # One read of both: the table is rebuilt on every poll, and two reads could straddle a rebuild.
        now_value, status = row.evaluate(
            "r => [r.querySelector('[role=progressbar]').getAttribute('aria-valuenow'), r.dataset.status]"
        )
        value = int(now_value)
        if not seen or seen[-1] != (value, status):
            seen.append((value, status))
        if status == "completed":
            break
        time.sleep(0.1)
    print(f"the page showed the batch at {len(seen)} progress points: {seen}")
    assert seen[-1] == (100, "completed"), seen
    assert [v for v, _ in seen] == sorted(v for v, _ in seen), f"progress went backwards: {seen}"
    assert any(v < 100 and s == "in_progress" for v, s in seen), f"never saw the batch running: {seen}"
    expect(bar).to_contain_text(f"{LINES + 1}/{LINES + 1}")
    assert row.locator("td.failed").inner_text() == "1"
    assert float(row.locator("td.lines-per-s").inner_text().replace(",", "")) > 0
    assert float(row.locator("td.tokens-per-s").inner_text().replace(",", "")) > 0

    row.click()
    expect(page.locator("#batch-detail")).to_be_visible()
    expect(page.locator("#detail-id")).to_have_text(batch["id"])
    error = page.locator("#batch-errors tr.line-error")
    expect(error).to_have_count(1)
    expect(error).to_contain_text("broken-line")
    expect(error).to_contain_text("model_not_found")
    expect(error).to_contain_text("no-such-model")
    expect(page.locator("#detail-count")).to_have_text("(1 failed)")

    # Workers counted every generated token of the batch, once, in the central counter.
    assert int(r.hget(keys.GENERATED_TOKENS, "tiny-gpt2") or 0) - before == LINES * TOKENS_PER_LINE


def test_models_workers_queue_depths_and_recent_jobs(page: Any, site: Site) -> None:
    with site.client() as qf:
        waiting = [qf.submit({"task": "echo", "model": "echo", "text": f"wait {i}"}) for i in range(3)]
        done = qf.submit({"task": "generate", "model": "tiny-gpt2", "prompt": "The cat", "max_new_tokens": 4})
        assert qf.wait(done, timeout=60)["state"] == "succeeded"
        depth = {
            q["queue"]: q["depth"]
            for q in httpx.get(f"{site.url}/v1/dashboard", headers={"Authorization": f"Bearer {site.key}"}).json()[
                "queues"
            ]
        }
    assert depth["echo"] >= 3
    open_dashboard(page, site)

    gpt2 = page.locator('#models tr[data-model="tiny-gpt2"]')
    expect(gpt2).to_have_attribute("data-workers", "1")
    expect(gpt2.locator(".worker.ready")).to_have_count(1)
    expect(gpt2.locator(".worker")).to_contain_text("tiny-gpt2@")
    expect(page.locator('#models tr[data-model="echo"]')).to_have_attribute("data-workers", "0")

    echo = page.locator('#queues tr[data-queue="echo"]')
    expect(echo.locator("td.depth")).to_have_text(str(depth["echo"]))
    expect(page.locator('#queues tr[data-queue="tiny-gpt2"] td.depth')).to_have_text("0")
    expect(page.locator("#tile-workers")).to_have_text("1")
    assert int(page.locator("#tile-queued").inner_text()) >= 3

    expect(page.locator(f'#jobs tr[data-job-id="{done}"]')).to_have_attribute("data-state", "succeeded")
    for job_id in waiting:
        expect(page.locator(f'#jobs tr[data-job-id="{job_id}"]')).to_have_attribute("data-state", "queued")


def _plotted(page: Any, chart: str) -> list[float]:
    values: list[float] = page.eval_on_selector_all(f"#{chart} circle.pt", "cs => cs.map(c => +c.dataset.v)")
    return values


def _wait_for_busy_plots(page: Any, site: Site) -> None:
    """Generate tokens now and keep echo work queued, then wait until both plots show non-zero samples."""
    with site.client() as qf:
        qf.submit({"task": "echo", "model": "echo", "text": "keeps the echo queue non-empty"})
        job = qf.submit(
            {"task": "generate", "model": "tiny-gpt2", "prompt": "A queue", "max_new_tokens": 64, "ignore_eos": True}
        )
        assert qf.wait(job, timeout=60)["state"] == "succeeded"
    # A rate needs two samples of the token count, and the count is first sampled once a worker has
    # flushed it: wait until each plot has at least two points, one of them above zero.
    for chart in ("plot-tokens", "plot-queues"):
        page.wait_for_function(
            f"() => {{ const v = [...document.querySelectorAll('#{chart} circle.pt')].map(c => +c.dataset.v);"
            " return v.length >= 2 && v.some(x => x > 0); }",
            timeout=60_000,
        )


def test_both_plots_draw_last_hour_samples(page: Any, site: Site) -> None:
    open_dashboard(page, site)
    _wait_for_busy_plots(page, site)
    tokens, queues = _plotted(page, "plot-tokens"), _plotted(page, "plot-queues")
    assert len(tokens) >= 2 and max(tokens) > 0
    assert len(queues) >= 2 and max(queues) >= 1
    expect(page.locator("#plot-tokens polyline")).not_to_have_count(0)
    expect(page.locator("#legend-tokens")).to_contain_text("tiny-gpt2")
    expect(page.locator("#legend-queues")).to_contain_text("echo")
    # Every plotted sample lies inside its chart (one read: the plots are redrawn as samples arrive).
    outside = page.evaluate(
        """() => ['plot-tokens', 'plot-queues'].flatMap((id) => {
            const box = document.getElementById(id).getBoundingClientRect();
            return [...document.querySelectorAll(`#${id} circle.pt`)].map((c) => c.getBoundingClientRect())
                .filter((d) => d.left < box.left - 1 || d.right > box.right + 1
                    || d.top < box.top - 1 || d.bottom > box.bottom + 1)
                .map((d) => `${id}: ${d.left},${d.top}`);
        })"""
    )
    assert outside == []


def _colored(img: Image.Image) -> int:
    """Pixels with a clear hue (series lines, progress fill, badges), not greys of text, grid or background."""
    rgb = np.asarray(img, dtype=np.int16)
    return int(((rgb.max(axis=2) - rgb.min(axis=2)) > 80).sum())


def test_screenshot_of_the_dashboard_renders_every_region(page: Any, site: Site, tmp_path: Path) -> None:
    open_dashboard(page, site)
    _wait_for_busy_plots(page, site)
    expect(page.locator("#batches tbody tr")).not_to_have_count(0)
    path = tmp_path / "dashboard.png"
    page.screenshot(path=str(path), full_page=True)
    shot = Image.open(path).convert("RGB")
    assert shot.width == 1400 and shot.height >= 900

    stat = ImageStat.Stat(shot)
    assert sum(stat.stddev) / 3 > 10, f"the page looks blank: {stat.stddev}"
    assert len(shot.getcolors(maxcolors=1 << 20) or []) > 100

    regions = {}
    for name in ("plot-tokens", "plot-queues", "batches", "models", "queues", "jobs"):
        box = page.locator(f"#{name}").bounding_box()
        assert box and box["width"] > 100 and box["height"] > 40, (name, box)
        regions[name] = shot.crop(
            (int(box["x"]), int(box["y"]), int(box["x"] + box["width"]), int(box["y"] + box["height"]))
        )
    for name in ("plot-tokens", "plot-queues"):
        plot = regions[name]
        assert _colored(plot) > 40, f"{name} has no drawn series"
        # A chart is more than a flat fill: axes, grid and the series vary it.
        assert sum(ImageStat.Stat(plot).stddev) / 3 > 5, f"{name} is flat"
    assert _colored(regions["batches"]) > 200, "no progress bars or status badges in the batches table"
    for name in ("models", "queues", "jobs"):
        assert sum(ImageStat.Stat(regions[name]).stddev) / 3 > 5, f"{name} is empty"
    assert re.match(r"^[\d.,]+$", page.locator("#tile-tokens").inner_text())


@pytest.fixture
def open_api(redis_url: str, tmp_path: Path) -> Iterator[str]:
    """An API alone with auth off (a single-user local cluster): no workers are needed to show the page."""
    cluster = Cluster(make_settings(redis_url, tmp_path), api_port=free_port(), worker_groups=[])
    with cluster.running(timeout=120):
        yield cluster.api_url


def test_with_auth_off_the_dashboard_opens_without_a_key(page: Any, open_api: str) -> None:
    page.goto(f"{open_api}/ui")
    expect(page.locator("#dashboard")).to_be_visible()
    expect(page.locator("#login")).to_be_hidden()
    expect(page.locator("#sign-out")).to_be_hidden()
    expect(page.locator("#tenant")).to_have_text("tenant: default")
    expect(page.locator("body")).to_have_attribute("data-ready", "1")
    expect(page.locator('#models tr[data-model="tiny-gpt2"]')).to_have_attribute("data-workers", "0")
    expect(page.locator("#batches-empty")).to_be_visible()
