"""The batch report, built from synthetic task documents in a real SQLite metadata store."""

from __future__ import annotations

import json
import re

import pytest

from megaflow.core.errors import NotFoundError
from megaflow.report import build_report, concurrency, fmt_s, summarize
from megaflow.report_svg import _downsample, percentile
from megaflow.stores.sqlite import SQLiteMetadataStore

T0 = 1_790_000_000.0
NOW = T0 + 500.0


def synthetic_batch(batch_id: str = "b-report", n: int = 40, running: int = 3) -> list[dict]:
    """n episodes on two hosts, both env modes, most succeeded, some failed / timed out / running."""
    docs = []
    for i in range(n):
        mode = "persistent" if i % 2 else "ephemeral"
        submitted = T0 + i
        admitted = submitted + (i % 5) * 2.0  # queue wait 0, 2, 4, 6, 8 s
        env_ready = admitted + (0.5 if mode == "persistent" else 10.0)
        steps = {f"step_{k}": env_ready + 5.0 * k for k in range(1, 4)}
        evaluating = env_ready + 15.0
        finished = evaluating + 3.0
        phases = {
            "submitted": submitted,
            "queued": submitted,
            "admitted": admitted,
            "env_starting": admitted + 0.1,
            "env_ready": env_ready,
            **steps,
            "evaluating": evaluating,
            "finished": finished,
        }
        state, cause, reward = "SUCCEEDED", None, 1.0
        if i in (3, 7, 11, 15):
            state, cause, reward = "FAILED", "tests_failed", 0.0
        elif i in (5, 9):
            state, cause, reward = "FAILED", "infra", None
        elif i in (13, 17):
            state, cause, reward = "TIMED_OUT", "timeout", None
        elif i == 19:
            state, cause, reward = "CANCELLED", "cancelled", None
        elif i >= n - running:  # still running: no evaluating / finished yet
            state, reward = "RUNNING", None
            phases = {k: v for k, v in phases.items() if k not in ("evaluating", "finished")}
        docs.append(
            {
                "episode_id": f"ep{i:03d}",
                "batch_id": batch_id,
                "user": "ann",
                "task_id": f"t{i}",
                "state": state,
                "cause": cause,
                "reward": reward,
                "host": f"host-{i % 2}",
                "mode": mode,
                "steps": 3,
                "prompt_tokens": 1000,
                "completion_tokens": 100,
                "created_at": submitted,
                "phases": phases,
            }
        )
    return docs


@pytest.fixture
def store(tmp_path):
    s = SQLiteMetadataStore(f"sqlite:///{tmp_path / 'meta.db'}")
    for doc in synthetic_batch():
        s.upsert_task(doc)
    s.upsert_task({"episode_id": "other", "batch_id": "other-batch", "state": "SUCCEEDED", "created_at": T0})
    yield s
    s.close()


def test_report_page_has_every_plot(store, tmp_path):
    page = build_report(store, "b-report", tmp_path / "out", host_capacity=8, now=NOW)
    assert page == tmp_path / "out" / "index.html"
    text = page.read_text()
    assert text.startswith("<!doctype html>")
    assert len(re.findall(r"<svg\b", text)) == 5
    for title in (
        "Concurrency over time",
        "Latency per phase",
        "Env start-up by mode",
        "Per-host utilisation",
        "Failure causes",
    ):
        assert f'aria-label="{title}"' in text
    for label in (
        "queue wait",
        "env start-up",
        "container boot",
        "agent step",
        "evaluation",
        "ephemeral",
        "persistent",
        "host-0",
        "host-1",
        "tests_failed",
        "infra",
        "timeout",
        "cancelled",
        "running (admitted → finished)",
        "waiting (submitted → admitted)",
    ):
        assert label in text, label
    assert "b-report" in text and "other-batch" not in text
    assert "still running" in text  # three episodes are live
    assert "(log scale)" in text  # env start-up spans 0.5 s .. 10 s, queue wait 0 .. 8 s


def test_summary_numbers(store, tmp_path):
    build_report(store, "b-report", tmp_path / "out", host_capacity=8, now=NOW)
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["batch_id"] == "b-report" and s["episodes"] == 40
    assert s["states"] == {"RUNNING": 3, "SUCCEEDED": 28, "FAILED": 6, "CANCELLED": 1, "TIMED_OUT": 2}
    assert s["success_rate"] == pytest.approx(28 / 37)
    assert s["failure_causes"] == {"tests_failed": 4, "infra": 2, "timeout": 2, "cancelled": 1}
    assert s["wall_s"] == pytest.approx(500.0) and s["live"] is True
    assert s["phases"]["queue wait"]["n"] == 40 and s["phases"]["queue wait"]["p50"] == pytest.approx(4.0)
    assert s["phases"]["queue wait"]["p95"] == pytest.approx(8.0)
    assert s["phases"]["agent step"]["p50"] == pytest.approx(5.0) and s["phases"]["agent step"]["n"] == 120
    assert s["phases"]["evaluation"]["n"] == 37 and s["phases"]["evaluation"]["p50"] == pytest.approx(3.0)
    assert s["env_startup_by_mode"]["persistent"]["p50"] == pytest.approx(0.5)
    assert s["phases"]["container boot"]["p50"] == pytest.approx((0.4 + 9.9) / 2)
    assert s["env_startup_by_mode"]["ephemeral"]["p50"] == pytest.approx(10.0)
    assert set(s["hosts"]) == {"host-0", "host-1"}
    assert sum(h["episodes"] for h in s["hosts"].values()) == 40
    assert 0 < s["hosts"]["host-0"]["utilisation"] < 1
    assert s["reward_mean"] == pytest.approx(28 / 32)
    assert s["prompt_tokens"] == 40_000


def test_report_of_finished_batch_without_capacity(tmp_path):
    store = SQLiteMetadataStore(f"sqlite:///{tmp_path / 'meta.db'}")
    for doc in synthetic_batch("done", n=10, running=0):
        store.upsert_task(doc)
    page = build_report(store, "done", tmp_path / "out")
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["live"] is False and s["end"] == T0 + 8 + 6.0 + 10.0 + 18.0  # ep008: ephemeral, queue wait 6 s
    assert s["hosts"]["host-0"]["utilisation"] is None and s["hosts"]["host-0"]["mean_concurrency"] > 0
    assert "mean episodes held at once" in page.read_text()
    store.close()


def test_unknown_batch(store, tmp_path):
    with pytest.raises(NotFoundError, match="nope"):
        build_report(store, "nope", tmp_path / "out")


def test_page_escapes_what_it_shows(tmp_path):
    store = SQLiteMetadataStore(f"sqlite:///{tmp_path / 'meta.db'}")
    store.upsert_task(
        {
            "episode_id": "x",
            "batch_id": "<b>",
            "state": "FAILED",
            "cause": "<script>alert(1)</script>",
            "host": "h&<",
            "mode": "ephemeral",
            "created_at": T0,
            "phases": {"submitted": T0, "admitted": T0 + 1, "env_ready": T0 + 2, "finished": T0 + 3},
        }
    )
    text = build_report(store, "<b>", tmp_path / "out").read_text()
    assert "<script>" not in text and "&lt;script&gt;" in text and "h&amp;&lt;" in text
    store.close()


def test_sparse_documents_still_give_a_page(tmp_path):
    store = SQLiteMetadataStore(f"sqlite:///{tmp_path / 'meta.db'}")
    store.upsert_task({"episode_id": "a", "batch_id": "b", "state": "SUBMITTED"})
    text = build_report(store, "b", tmp_path / "out").read_text()
    assert len(re.findall(r"<svg\b", text)) == 5 and "no data" in text
    store.close()


def test_helpers():
    assert percentile([], 50) is None
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 95) == 5
    assert concurrency([(0, 10, None), (5, 15, None), (10, 20, None)]) == [(0, 1), (5, 2), (10, 2), (15, 1), (20, 0)]
    assert [fmt_s(x) for x in (0.25, 12.34, 300, 9000, None)] == ["250 ms", "12.3 s", "5.0 min", "2.5 h", "–"]
    points = [(float(t), float(t % 97)) for t in range(20_000)]
    reduced = _downsample(points)
    assert len(reduced) <= 3001 and max(v for _, v in reduced) == 96 and reduced[-1] == points[-1]


def test_summarize_empty_and_live_only():
    s = summarize([{"episode_id": "a", "state": "RUNNING", "phases": {"submitted": 10.0, "admitted": 11.0}}], now=20.0)
    assert s["wall_s"] == 10.0 and s["success_rate"] is None and s["hosts"]["unknown"]["busy_s"] == 9.0
