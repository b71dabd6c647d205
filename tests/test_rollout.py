"""The agent service end to end on the shared fleet: real workers, real containers, the scripted model.

Reference fixes resolve every built-in task and no-op runs resolve none (SWE-bench reports);
format errors get the format message; limits end episodes with the right cause; rollout groups
come back complete (infra failures retried, then masked); resume re-runs only infra failures.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from megaflow import Client
from megaflow.agents.bash import FORMAT_ERROR
from megaflow.core import states
from megaflow.core.spec import SUBMIT_WORD
from megaflow.demo_tasks import demo_specs, fix_replies, instances, noop_replies, task_spec
from megaflow.stores import open_metadata_store
from tests.helpers import run_cli, wait_until

pytestmark = pytest.mark.usefixtures("fleet")

# Kills the container's main process: every later step on it fails as an infrastructure error.
KILL_CONTAINER = "```bash\nkill -9 $(cat /proc/1/task/1/children)\n```"


def megaflow(settings, *args: str) -> subprocess.CompletedProcess:
    return run_cli(settings, *args, timeout=200)


def wait_records(settings, batch_id: str, n: int, timeout: float = 30.0) -> list[dict]:
    """The batch's task documents once the recorder has written all of them as terminal."""
    store = open_metadata_store(settings.metadata_url, settings)
    try:

        def complete() -> list[dict] | None:
            docs = store.find_tasks(batch_id=batch_id)
            if len(docs) == n and all(d["state"] in states.TERMINAL and d.get("artifact_uri") for d in docs):
                return docs
            return None

        return wait_until(
            complete, timeout, lambda: f"{n} records ({len(store.find_tasks(batch_id=batch_id))} so far)", 0.3
        )
    finally:
        store.close()


def by_task(results: list[dict]) -> dict[str, dict]:
    return {r["task_id"]: r for r in results}


def test_reference_fix_resolves_every_task_and_noop_none(fleet):
    with Client(fleet) as client:
        noop = client.submit(demo_specs("noop"), user="ag-noop")
        groups = list(client.rollout(demo_specs("fix"), replicas=1, user="ag-fix", timeout=240))
        client.wait(noop.batch_id, timeout=240)
        assert len(groups) == len(instances())
        for g in groups:
            ep = g["episodes"][0]
            assert g["rewards"] == [1.0] and not g["masked"], (g["task_id"], ep["cause"], ep["error"])
            report = ep["report"]
            assert report["resolved"] and report["patch_exists"] and report["test_patch_applied"]
            assert not report["tests_status"]["FAIL_TO_PASS"]["failure"]
            assert set(report["test_results"].values()) == {"PASSED"}
            assert report["model_patch"].startswith("diff --git")
        for r in client.results(noop.batch_id):
            assert (r["state"], r["reward"], r["cause"]) == (states.FAILED, 0.0, states.CAUSE_TESTS)
            traj = client.trajectory(r["episode_id"])
            rep = traj["report"]
            assert rep["resolved"] is False and rep["patch_exists"] is False
            assert (
                rep["empty_patch"] is True and rep["tests_status"] is None
            )  # as the harness: an empty patch is not run
            assert traj["messages"][-1]["role"] == "evaluation" and traj["steps"][-1]["action"]["type"] == "submit"


def test_format_errors_limits_mini_mode_and_fresh_evaluation(fleet, tmp_path):
    inst = instances()
    fix = inst[0]["patch"]
    cmd = "```bash\nls\n```"
    mini_yaml = tmp_path / "mini.yaml"
    mini_yaml.write_text(
        "agent:\n  system_template: sys\n  instance_template: 'Task: {{task}}'\n  step_limit: 10\n"
        "model:\n  model_class: litellm_textbased\n  cost_tracking: ignore_errors\n"
        "  observation_template: 'rc={{output.returncode}}'\n"
    )
    specs = {
        "format-recovers": task_spec(inst[0], replies=["I think calc.py is wrong."] + fix_replies(fix)),
        "format-limit": task_spec(inst[1], replies=["no", "still no", "nope"], agent_config={"max_format_errors": 2}),
        "step-limit": task_spec(inst[2], replies=[cmd] * 4, agent_config={"max_steps": 2}),
        "token-limit": task_spec(inst[3], replies=[cmd] * 4, agent_config={"max_tokens": 30}),
        "wall-limit": task_spec(
            inst[4], replies=["```bash\nsleep 3\n```", SUBMIT_WORD], agent_config={"wall_time_s": 1.5}
        ),
        "mini": task_spec(
            inst[0],
            agent_config=str(mini_yaml),
            replies=[
                f"THOUGHT: fix it\n```mswea_bash_command\ngit apply <<'EOF'\n{fix}EOF\n```",
                "```mswea_bash_command\necho COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT\n```",
            ],
        ),
        "fresh": task_spec(inst[0], replies=fix_replies(fix), fresh_container=True),
    }
    for name, spec in specs.items():
        spec["task_id"] = name
    with Client(fleet) as client:
        sub = client.submit(list(specs.values()), user="ag-limits")
        client.wait(sub.batch_id, timeout=180)
        res = by_task(client.results(sub.batch_id))
        traj = {name: client.trajectory(r["episode_id"]) for name, r in res.items()}

    ok = res["format-recovers"]
    assert (ok["state"], ok["reward"]) == (states.SUCCEEDED, 1.0)
    fmt_msgs = [m for m in traj["format-recovers"]["messages"] if m.get("kind") == "format_error"]
    assert [m["content"] for m in fmt_msgs] == [FORMAT_ERROR.format(submit_word=SUBMIT_WORD)]
    assert traj["format-recovers"]["steps"][0]["action"]["type"] == "format_error"

    expect = {
        "format-limit": (states.FAILED, states.CAUSE_FORMAT, "format error limit"),
        "step-limit": (states.FAILED, states.CAUSE_AGENT_LIMIT, "step limit reached (2 model calls)"),
        "token-limit": (states.FAILED, states.CAUSE_AGENT_LIMIT, "token limit reached"),
        "wall-limit": (states.TIMED_OUT, states.CAUSE_TIMEOUT, "wall-time limit reached"),
    }
    for name, (state, cause, reason) in expect.items():
        r = res[name]
        assert (r["state"], r["cause"]) == (state, cause), (name, r["error"])
        assert reason in r["error"] and traj[name]["cause"] == cause
    assert res["step-limit"]["steps"] == 2

    mini = res["mini"]
    assert (mini["state"], mini["reward"]) == (states.SUCCEEDED, 1.0), mini["error"]
    msgs = [m for m in traj["mini"]["messages"] if m["role"] in ("system", "user", "assistant")]  # the chat
    assert msgs[0]["content"] == "sys" and msgs[1]["content"].startswith("Task: calc.add")
    assert msgs[3]["content"] == "rc=0" and traj["mini"]["report"]["resolved"]

    # the task records (metadata store, via the recorder) carry the cause and link the trajectory
    docs = wait_records(fleet, sub.batch_id, len(specs))
    for doc in docs:
        r = res[doc["task_id"]]
        assert (doc["state"], doc.get("cause")) == (r["state"], r["cause"])
        assert doc["artifact_uri"] == r["artifact_uri"] and doc["artifact_uri"].startswith("file://")
    assert {d["task_id"]: d.get("resolved") for d in docs}["mini"] is True

    fresh = traj["fresh"]
    assert res["fresh"]["state"] == states.SUCCEEDED, json.dumps(fresh["report"], indent=1)[:3000]
    assert fresh["report"]["fresh_container"] is True
    assert fresh["report"]["patch_successfully_applied"] and fresh["report"]["resolved"]


def test_rollout_yields_complete_groups_and_masks_infra_failures(fleet):
    inst = instances()
    tasks = [
        task_spec(inst[0], replies=fix_replies(inst[0]["patch"])),
        task_spec(inst[1], replies=noop_replies()),
        task_spec(inst[2], replies=[KILL_CONTAINER, SUBMIT_WORD]),
    ]
    with Client(fleet) as client:
        groups = list(
            client.rollout(
                tasks, replicas=2, policy_version="pv-7", user="ag-rollout", max_infra_retries=1, timeout=180
            )
        )
        assert sorted(g["index"] for g in groups) == [0, 1, 2]
        g = {x["index"]: x for x in groups}
        assert g[0]["rewards"] == [1.0, 1.0] and not g[0]["masked"]
        assert g[1]["rewards"] == [0.0, 0.0] and not g[1]["masked"]
        assert g[2]["masked"] and g[2]["rewards"] == [None, None] and "infrastructure" in g[2]["mask_reason"]
        for ep in g[2]["episodes"]:
            assert ep["cause"] == states.CAUSE_INFRA and ep["attempts"] == 2 and len(ep["retried_from"]) == 1
        for group in groups:
            assert group["policy_version"] == "pv-7" and len(group["episodes"]) == 2
        ep = g[0]["episodes"][0]
        assert ep["messages"][0]["role"] == "system" and ep["tokens"]["turns"]
        assert ep["tokens"]["prompt_tokens"] == ep["prompt_tokens"] > 0
        assert all(t["policy_version"] == "pv-7" for t in ep["tokens"]["turns"])
        assert [s["action"]["type"] for s in ep["trajectory_steps"]] == ["exec", "exec", "submit"]
        # the retries are linked from the rollout's batch: final_results shows the last attempts
        final = client.final_results(g[2]["batch_id"])
        assert len(final) == 6 and sum(r["episode_id"] != r["original_episode_id"] for r in final) == 2


def test_resume_reruns_only_infra_failures(fleet):
    inst = instances()
    specs = [
        task_spec(inst[0], replies=fix_replies(inst[0]["patch"])),
        task_spec(inst[1], replies=noop_replies()),
        task_spec(inst[2], replies=[KILL_CONTAINER, SUBMIT_WORD]),
    ]
    with Client(fleet) as client:
        sub = client.submit(specs, user="ag-resume")
        client.wait(sub.batch_id, timeout=120)
        first = client.results(sub.batch_id)
        assert [r["cause"] for r in first] == [None, states.CAUSE_TESTS, states.CAUSE_INFRA]
        res = client.resume(sub.batch_id)
        assert list(res.resubmitted) == [sub.episode_ids[2]] and res.skipped_finished == 2
        client.wait(res.rerun_batch, timeout=120)
        # the CLI follows the re-run: its latest attempt failed for infra again, so it runs once more
        proc = run_cli(fleet, "resume", sub.batch_id, "--wait", timeout=200, check=False)
        assert proc.returncode == 4, proc.stderr  # the latest attempt is an infra failure again: exit status 4
        assert "1 infra failures re-run as batch" in proc.stdout and "2 finished (skipped)" in proc.stdout
        final = client.final_results(sub.batch_id)
        assert [r["original_episode_id"] for r in final] == sub.episode_ids
        assert final[2]["episode_id"] not in (sub.episode_ids[2], res.resubmitted[sub.episode_ids[2]])
        assert final[2]["episode_id"].startswith(f"{sub.batch_id}-resume2-") and final[2]["state"] in states.TERMINAL
        assert final[0]["episode_id"] == sub.episode_ids[0] and final[0]["state"] == states.SUCCEEDED
        # a batch with nothing lost to the infrastructure re-runs nothing
        clean = client.submit(specs[:1], user="ag-resume")
        client.wait(clean.batch_id, timeout=120)
        nothing = client.resume(clean.batch_id)
        assert nothing.rerun_batch is None and nothing.skipped_finished == 1


def test_cli_rollout_from_swebench_instances(fleet, tmp_path):
    inst = instances()[5]
    data = tmp_path / "tasks.jsonl"
    # as on the Hugging Face hub: the test lists are JSON text
    line = dict(inst, FAIL_TO_PASS=json.dumps(inst["FAIL_TO_PASS"]), PASS_TO_PASS=json.dumps(inst["PASS_TO_PASS"]))
    data.write_text(json.dumps(line) + "\n")
    out = tmp_path / "out.jsonl"
    model = json.dumps({"backend": "scripted", "replies": fix_replies(inst["patch"])})
    proc = megaflow(
        fleet,
        "rollout",
        str(data),
        "--replicas",
        "2",
        "--out",
        str(out),
        "--user",
        "ag-cli",
        "--model",
        model,
        "--timeout",
        "120",
    )
    groups = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(groups) == 1 and groups[0]["rewards"] == [1.0, 1.0] and groups[0]["task_id"] == inst["instance_id"]
    assert "1 groups written" in proc.stdout
