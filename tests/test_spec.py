"""Task-spec validation: a bad spec names its field; a rejected batch enqueues nothing."""

from __future__ import annotations

import pytest

from megaflow import Client
from megaflow.core.errors import SpecError
from megaflow.core.spec import validate_specs
from megaflow.demo_tasks import demo_specs


def good() -> dict:
    return demo_specs("fix")[0]


def test_demo_specs_validate():
    assert len(validate_specs(demo_specs("fix"))) >= 10
    assert len(validate_specs(demo_specs("noop"))) >= 10


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda s: s.pop("eval"), "eval"),
        (lambda s: s.update(task_id=""), "task_id"),
        (lambda s: s.update(colour="red"), "colour"),
        (lambda s: s["eval"].update(command=""), "eval.command"),
        (lambda s: s.update(files={"relative.txt": "x"}), "files"),
        (
            lambda s: s["agent"].update(max_steps=0) if "agent" in s else s.update(agent={"max_steps": 0}),
            "agent.max_steps",
        ),
        (lambda s: s.update(mode="sometimes"), "mode"),
        (lambda s: s.update(task_id="$(reboot)"), "task_id"),
        (lambda s: s.update(image="../../x"), "image"),
        (lambda s: s.update(workdir="/proc/self"), "workdir"),
        (lambda s: s.update(files={"/repo/../etc/passwd": "x"}), "files"),
        (lambda s: s.setdefault("agent", {}).update(env={"LD_PRELOAD": "/x.so"}), "agent.env"),
        (lambda s: s.setdefault("agent", {}).update(wall_time_s=float("inf")), "agent.wall_time_s"),
        (lambda s: s.setdefault("model", {}).update(temperature=float("nan")), "model.temperature"),
        (
            lambda s: s.update(metadata={"a": {"b": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}}),
            "metadata",
        ),
    ],
)
def test_bad_field_is_named(mutate, field):
    spec = good()
    mutate(spec)
    with pytest.raises(SpecError) as exc:
        validate_specs([good(), spec])
    assert exc.value.index == 1
    assert exc.value.field == field
    assert f"'{field}'" in str(exc.value) and "spec #1" in str(exc.value)


def test_not_an_object():
    with pytest.raises(SpecError, match="must be a JSON object"):
        validate_specs(["echo hi"])


def test_empty_batch():
    with pytest.raises(SpecError, match="at least one"):
        validate_specs([])


def test_rejected_batch_enqueues_nothing(settings, redis_client):
    bad = good()
    bad["eval"] = {"timeout_s": 5}
    with Client(settings) as client:
        with pytest.raises(SpecError, match="eval.command"):
            client.submit([good(), good(), bad], user="alice")
        with pytest.raises(SpecError, match="user"):
            client.submit([good()], user="no spaces allowed")
    assert redis_client.keys("*") == []


def test_unreachable_redis_is_a_clear_error(tmp_path):
    from megaflow.core.errors import ServiceUnavailableError
    from megaflow.core.settings import Settings
    from tests.conftest import free_port

    s = Settings.load(redis_url=f"redis://127.0.0.1:{free_port()}/0", state_dir=str(tmp_path))
    with pytest.raises(ServiceUnavailableError, match="MEGAFLOW_REDIS_URL"):
        Client(s).submit([good()], user="alice")


def test_model_section_checked_at_submit(settings, redis_client):
    openai = dict(good(), model={"backend": "openai", "endpoints": ["not-a-url"]})
    unknown = dict(good(), model={"backend": "telepathy"})
    no_replies = dict(good(), model={"backend": "scripted"})
    with Client(settings) as client:
        with pytest.raises(SpecError, match="model.endpoints") as exc:
            client.submit([good(), openai], user="alice")
        assert exc.value.index == 1
        with pytest.raises(SpecError, match="model.backend"):
            client.submit([unknown], user="alice")
        with pytest.raises(SpecError, match="model.replies"):
            client.submit([no_replies], user="alice")
    assert redis_client.keys("*") == []


def test_settings_bound_spec_limits(settings, redis_client):
    """A per-spec time limit above what the fleet's settings allow is refused at submit, naming both."""
    slow = good()
    slow.setdefault("agent", {})["command_timeout_s"] = 10 * settings.step_time_limit_s
    with Client(settings) as client:
        with pytest.raises(SpecError, match="agent.command_timeout_s.*MEGAFLOW_COMMAND_TIMEOUT_S"):
            client.submit([slow], user="alice")
    assert redis_client.keys("*") == []


def test_generated_and_given_batch_ids(settings, redis_client):
    with Client(settings) as client:
        a = client.submit([good()], user="alice")
        b = client.submit([good()], user="alice", batch_id="mine-1")
        with pytest.raises(SpecError, match="batch_id"):
            client.submit([good()], user="alice", batch_id="mine-1")
    assert a.batch_id.startswith("b-") and b.batch_id == "mine-1" and b.episode_ids == ["mine-1-00000"]
