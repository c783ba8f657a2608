"""A real Prometheus scrapes the server; every query of the Grafana dashboard returns data."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from importlib import resources

import pytest
import requests
from helpers import data_url, make_image

from lvlm_prune.benchmarks.harness import metric, scrape
from server_api.serving import MODEL, free_port

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="needs the prometheus binary (Debian package)"
)


def dashboard() -> dict:
    return json.loads(
        resources.files("lvlm_prune.server").joinpath("monitoring/grafana.json").read_text()
    )


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("prometheus")
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: lvlm-prune\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{server.port}']\n"
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(workdir / "log").open("w"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def query(prometheus: str, expr: str) -> list:
    response = requests.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=30)
    body = response.json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def test_every_dashboard_query_returns_data(prometheus, client):
    for phase in range(2):  # increases on both sides of a scrape, so every rate() is non-zero
        for ratio, method in ((0.25, "simignore"), (0.5, "uniform"), (1.0, "simignore")):
            client.chat.completions.create(
                model=MODEL,
                max_tokens=2,
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {"url": data_url(make_image(50 + phase))},
                            },
                            {"type": "text", "text": f"what is here {ratio}?"},
                        ],
                    }
                ],
                extra_body={"pruning": {"keep_ratio": ratio, "method": method}},
            )
        time.sleep(7)  # the server drains worker timings every 5 s; Prometheus scrapes every 1 s

    assert (
        MODEL
        in requests.get(
            f"{prometheus}/api/v1/label/model_name/values",
            params={"match[]": "lvlm_prune_images_total"},
            timeout=30,
        ).json()["data"]
    )
    targets = [t for panel in dashboard()["panels"] for t in panel["targets"]]
    assert len(targets) >= 8
    for target in targets:
        expr = target["expr"].replace("$model_name", MODEL).replace("$__rate_interval", "1m")
        result = query(prometheus, expr)
        assert result, f"no data for {target['expr']}"
        values = [float(r["value"][1]) for r in result]
        assert any(not math.isnan(v) for v in values), (target["expr"], values)


def test_metrics_names_and_counts(server, client):
    before = _scrape(server)
    client.chat.completions.create(
        model=MODEL,
        max_tokens=2,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(make_image(60))}},
                    {"type": "text", "text": "count me"},
                ],
            }
        ],
        extra_body={"pruning": {"keep_ratio": 0.25, "method": "uniform"}},
    )
    after = _scrape(server)

    def grew(name: str, **labels: str) -> float:
        return metric(after, name, model_name=MODEL, **labels) - metric(
            before, name, model_name=MODEL, **labels
        )

    # No preset named: the per-request series carry preset="none" (presets: test_presets.py).
    assert grew("lvlm_prune_image_tokens_before_total", preset="none") == 576
    assert grew("lvlm_prune_image_tokens_after_total", preset="none") == 144
    assert grew("lvlm_prune_requests_total", method="uniform", preset="none") == 1
    assert metric(after, "lvlm_prune_model_pruned", model_name=MODEL) == 1  # 0: unsupported


def _scrape(server) -> dict[str, float]:
    return scrape(server.url)
