"""The submission API: ``megaflow.Client(settings).submit(specs, user=...)`` and friends.

With a per-person Redis user (``megaflow acl add-user NAME``) the client touches no fleet key itself:
each operation is a request the control service serves as that person, on that person's batches only
(:mod:`megaflow.security.requests`; ``Client.serve_person`` is the control side).
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import redis

from megaflow.core import guards, states
from megaflow.core.errors import MegaflowError, NotFoundError, ServiceUnavailableError, SpecError
from megaflow.core.settings import Settings
from megaflow.core.spec import TaskSpec, validate_specs
from megaflow.security import requests as person_requests
from megaflow.security.identity import authenticated_user, check_submitter, is_person
from megaflow.services import lifecycle
from megaflow.services.root import Root

log = logging.getLogger(__name__)

_USER = guards.USER_NAME  # fullmatch: no trailing newline
_EPISODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,160}")  # <batch id>-<index>
PERSON_TIMEOUT_S = 300.0  # a per-person request waits this long for the control service's answer
SUBMIT_PART = 250  # episodes written (one MULTI with their FIFO places) and admitted at a time by a submit

# Reserve a batch id, refused when that batch exists in any form, so no submit overwrites another's
# episodes. KEYS[1] batch hash, KEYS[2] batch episode list, KEYS[3] batch index (sorted set);
# ARGV[1] batch id, ARGV[2] user, ARGV[3] time of the reservation. Returns 1 if reserved, else 0.
RESERVE_BATCH = """
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 or redis.call('ZSCORE', KEYS[3], ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'user', ARGV[2], 'reserved_at', ARGV[3])
return 1
"""


@dataclass
class Submission:
    """A submitted batch: its id and its episode ids in submission order."""

    batch_id: str
    episode_ids: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return self.batch_id


class Client:
    """Submit batches of task specs, follow them, and read their results."""

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings.load()
        self.rt = Root(self.settings, role="client")
        self._who: str | None = None
        self.person_timeout_s = PERSON_TIMEOUT_S

    @classmethod
    def on_root(cls, rt: Root) -> Client:
        """A client on an existing Root (the control service's, to serve per-person requests)."""
        client = cls.__new__(cls)
        client.settings, client.rt, client._who = rt.settings, rt, None
        client.person_timeout_s = PERSON_TIMEOUT_S
        return client

    def person(self) -> str | None:
        """The per-person Redis user this client authenticated as, or None (the operator, a fleet role)."""
        if self._who is None:
            try:
                self._who = authenticated_user(self.rt.redis)
            except redis.exceptions.NoPermissionError:  # not one of our users: it acts directly (and ACLs judge)
                self._who = ""
        return self._who if self._who and is_person(self.settings.key_prefix, self._who) else None

    def _ask(self, person: str, op: str, **args: Any) -> Any:
        return person_requests.call(self.rt.redis, self.rt.keys, person, op, args, timeout=self.person_timeout_s)

    def ask(self, op: str, **args: Any) -> Any:
        """Send request ``op`` as this client's person (see megaflow.security.requests); for the CLI's
        ``status``, whose records only the control service may read for a person."""
        person = self.person()
        if person is None:
            raise MegaflowError(f"{op}: only a per-person Redis user sends requests")
        return self._ask(person, op, **args)

    def owns(self, person: str, batch_id: Any) -> bool:
        """Whether ``batch_id`` is a batch ``person`` submitted (its owner, recorded at submit)."""
        if not isinstance(batch_id, str) or not guards.BATCH_ID.fullmatch(batch_id):
            return False
        owner = self.rt.redis.hget(self.rt.keys.batch(batch_id), "user")
        if owner is None:  # Redis forgot it (flushed, expired): the records still name the user
            docs = self.rt.metadata.find_tasks(batch_id=batch_id, limit=1)
            owner = docs[0].get("user") if docs else None
        return owner == person

    def _refuse_person(self, what: str) -> None:
        if self.person():
            raise MegaflowError(
                f"{what} is not available to a per-person Redis user yet ({self._who}); submit, status, "
                "results, cancel and trajectory are; ask the operator to run it"
            )

    def _check_redis(self) -> None:
        try:
            self.rt.redis.ping()
        except redis.RedisError as exc:
            raise ServiceUnavailableError(
                f"cannot reach Redis at MEGAFLOW_REDIS_URL ({_safe_url(self.settings.redis_url)}): {exc}; "
                "start it (`make demo` does) or fix the URL"
            ) from None

    def submit(
        self,
        specs: dict[str, Any] | TaskSpec | Iterable[dict[str, Any] | TaskSpec],
        *,
        user: str,
        batch_id: str | None = None,
    ) -> Submission:
        """Validate every spec, then enqueue them all as one batch; a bad spec enqueues nothing.

        The batch is written ``SUBMIT_PART`` episodes at a time, each part one MULTI with its FIFO
        places, and each part is admitted before the next is written. A failure part way (Redis
        lost) cancels the episodes already written, then raises.
        """
        if not isinstance(user, str) or not _USER.fullmatch(user):
            raise SpecError(
                "field 'user': must be 1-64 characters of letters, digits, '_', '.', '@' or '-'", field="user"
            )
        if batch_id is not None and (not isinstance(batch_id, str) or not guards.BATCH_ID.fullmatch(batch_id)):
            raise SpecError(
                f"field 'batch_id': {guards.show(batch_id)} is not allowed: use {guards.BATCH_ID_RULE}, "
                "or leave it out to get a generated one",
                field="batch_id",
            )
        valid = validate_specs(_take(specs, self.settings.max_batch_episodes))
        check_models(valid, self.settings)
        valid = check_agents(valid)
        check_limits(valid, self.settings)
        self._check_redis()
        check_submitter(self.rt.redis, self.settings.key_prefix, user)  # with per-person ACL users: no other name
        if person := self.person():  # control submits it as this person (and checks it all again)
            done = self._ask(
                person,
                "submit",
                specs=[s.model_dump(mode="json", exclude_unset=True) for s in valid],
                batch_id=batch_id or _new_batch_id(),  # named here: a request served twice cannot make two batches
            )
            return Submission(done["batch_id"], done["episode_ids"])
        valid = self._auto_modes(valid)
        submitted_at = time.time()
        bid = self._reserve(batch_id, user)
        ids: list[str] = []
        try:
            for lo in range(0, len(valid), SUBMIT_PART):
                part = valid[lo : lo + SUBMIT_PART]
                images = [spec.image or self.settings.default_image for spec in part]

                def fifo(pipe: Any, part_ids: list[str], images: list[str] = images) -> None:
                    rows = [{"episode_id": e, "user": user, "image": im} for e, im in zip(part_ids, images)]
                    self.rt.resources.enqueue_in(pipe, rows)

                _, part_ids = self.rt.engine.create_batch(
                    part, user, bid, start=lo, size=len(valid), submitted_at=submitted_at, also=fifo
                )
                ids += part_ids
                # this part starts while the next one is written (one round admits it all, no empty round after)
                lifecycle.admit(self.rt, len(part) + 1)
        except BaseException as exc:
            self._abandon(bid, len(ids), len(valid), exc)
            raise
        return Submission(bid, ids)

    def _abandon(self, batch_id: str, written: int, size: int, exc: BaseException) -> None:
        """A submit failed part way: cancel the episodes it wrote (each part is one MULTI), or drop the batch."""
        try:
            # no part written (its MULTI did not happen, or its reply was lost after it did: check)
            if not written and not self.rt.redis.exists(self.rt.keys.batch_episodes(batch_id)):
                self.rt.redis.delete(self.rt.keys.batch(batch_id))  # only the reservation was written
                return
            why = f"cancelled: the submit of batch {batch_id} failed after {written} of {size} episodes: "
            why = (why + f"{type(exc).__name__}: {exc}")[:500]
            n = sum(1 for eid in self.rt.engine.batch_ids(batch_id) if self.rt.lifecycle.cancel(eid, error=why))
            log.error("batch %s: submit failed part way (%s); cancelled the %d episodes it wrote", batch_id, exc, n)
        except Exception as again:  # Redis is gone: they stay queued, each with its FIFO place, and will run
            log.error(
                "batch %s: submit failed part way (%s) and its %d written episodes could not be cancelled (%s): "
                "cancel it with `megaflow batch cancel %s` once Redis is back",
                batch_id,
                exc,
                written,
                again,
                batch_id,
            )

    def _reserve(self, batch_id: str | None, user: str) -> str:
        """Reserve ``batch_id`` (or a generated id) atomically; an id in use raises SpecError."""
        keys = self.rt.keys
        script = self.rt.redis.register_script(RESERVE_BATCH)
        for _ in range(5):
            bid = batch_id or _new_batch_id()
            if batch_id and self._recorded(bid):
                break
            if script(keys=[keys.batch(bid), keys.batch_episodes(bid), keys.batches], args=[bid, user, time.time()]):
                return bid
            if batch_id:
                break
        raise SpecError(
            f"field 'batch_id': batch {bid!r} already exists; a batch id names one batch only: choose "
            "a new id, or leave it out to get a generated one",
            field="batch_id",
        )

    def _recorded(self, batch_id: str) -> bool:
        """Whether the metadata store holds episodes of ``batch_id`` (Redis may have been flushed since)."""
        try:
            return bool(self.rt.metadata.count_by_state(batch_id=batch_id))
        except MegaflowError as exc:  # Redis stays the authority; a store we cannot read does not block submits
            log.warning("cannot check batch id %s against the metadata store: %s", batch_id, exc)
            return False

    def _auto_modes(self, specs: list[TaskSpec]) -> list[TaskSpec]:
        """With ``elastic.auto_mode``: ephemeral or persistent per image from demand (a spec's own mode wins)."""
        if not self.settings.elastic:
            return specs
        from megaflow.elastic import modes
        from megaflow.elastic.config import ElasticConfig

        cfg = ElasticConfig.from_settings(self.settings)
        if not cfg.auto_mode:
            return specs
        hosts = max(1, len(self.rt.resources.hosts()))
        choices = modes.auto_modes(self.rt.redis, self.rt.keys, self.settings, specs, hosts=hosts, cfg=cfg)
        modes.publish_pools(self.rt.redis, self.settings.key_prefix, choices)
        default = self.settings.default_image
        return [
            s
            if s.mode or (s.image or default) not in choices
            else s.model_copy(update={"mode": choices[s.image or default].mode})
            for s in specs
        ]

    def status(self, batch_id: str) -> dict[str, Any]:
        """Counts by state of a batch, from the live episode state.

        ``unwritten`` (only when > 0): episodes of the batch its submit has not written (yet: a submit
        writes 250 at a time; or ever: a submit that died part way).
        """
        if person := self.person():
            return dict(self._ask(person, "status", batch_id=batch_id))
        ids = self.rt.engine.batch_ids(batch_id)
        counts: dict[str, int] = {}
        for view in self.rt.engine.summaries(ids):
            counts[view["state"]] = counts.get(view["state"], 0) + 1
        done = sum(counts.get(s, 0) for s in states.TERMINAL)
        out = {"batch_id": batch_id, "total": len(ids), "done": done, "counts": counts}
        size = self.rt.redis.hget(self.rt.keys.batch(batch_id), "size")
        if size is not None and int(size) > len(ids):
            out["unwritten"] = int(size) - len(ids)
        return out

    def wait(
        self,
        batch_id: str,
        *,
        timeout: float | None = None,
        poll_s: float = 0.5,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, Any]:
        """Block until every episode of the batch is terminal (or ``timeout``); return status()."""
        if self.person():
            return self._wait_by_status(batch_id, timeout, poll_s, on_progress)
        total = len(self.rt.engine.batch_ids(batch_id))
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            done = self.rt.redis.scard(self.rt.keys.batch_done(batch_id))
            if on_progress:
                on_progress(done, total)
            if done >= total:
                return self.status(batch_id)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"batch {batch_id}: {done}/{total} episodes finished after {timeout}s")
            time.sleep(poll_s)

    def _wait_by_status(
        self, batch_id: str, timeout: float | None, poll_s: float, on_progress: Callable[[int, int], None] | None
    ) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status(batch_id)
            if on_progress:
                on_progress(status["done"], status["total"])
            if status["done"] >= status["total"]:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(
                    f"batch {batch_id}: {status['done']}/{status['total']} episodes finished after {timeout}s"
                )
            time.sleep(max(poll_s, 1.0))

    def results(self, batch_id: str) -> list[dict[str, Any]]:
        """One result per episode: state, reward, cause, artifact URI, token counts, phase times."""
        if person := self.person():
            return list(self._ask(person, "results", batch_id=batch_id))
        return self.rt.engine.summaries(self.rt.engine.batch_ids(batch_id))

    def trajectory(self, episode_id: str) -> dict[str, Any]:
        """The saved trajectory of a finished episode."""
        if person := self.person():
            return dict(self._ask(person, "trajectory", episode_id=episode_id))
        view = self.rt.engine.summaries([episode_id])
        uri = view[0]["artifact_uri"] if view else None
        if not uri:
            doc = self.rt.metadata.get_task(episode_id) or {}
            uri = doc.get("artifact_uri")
        if not uri:
            from megaflow.core.errors import NotFoundError

            raise NotFoundError(f"episode {episode_id} has no trajectory yet (not finished, or unknown)")
        return json.loads(self.rt.artifacts.get_bytes(uri))

    def cancel(self, batch_id: str) -> int:
        """End every unfinished episode of the batch now (any state); return how many it ended."""
        if person := self.person():
            return int(self._ask(person, "cancel", batch_id=batch_id))
        n = sum(1 for eid in self.rt.engine.batch_ids(batch_id) if self.rt.lifecycle.cancel(eid))
        self.rt.lifecycle.admit()
        return n

    def rollout(
        self,
        tasks: Iterable[Any],
        *,
        replicas: int = 1,
        policy_version: str | None = None,
        user: str = "rollout",
        max_infra_retries: int = 2,
        timeout: float | None = None,
        trajectories: bool = True,
        oversample: int | None = None,
        grace: float = 0.5,
        priority: bool = False,
    ):
        """Run every task ``replicas`` times; iterate over the groups (rewards, trajectories, token data).

        Tasks are TaskSpec dicts or SWE-bench instances. Submits at once and returns a RolloutRun
        (its ``batch_id`` names the batch) that yields each group as soon as all its replicas are
        final. Infra failures are retried as new episodes up to ``max_infra_retries`` times; a group
        still holding one comes with ``masked: true``. ``oversample`` n > ``replicas`` k runs n per
        group and keeps k (the lowest replica indices finished by the group's deadline, ``grace``),
        cancelling the rest; ``priority`` favours trajectories further along. See megaflow.rollout.
        """
        from megaflow.rollout import Rollout

        self._refuse_person("rollout")
        cap = self.settings.max_batch_episodes
        checks = [("replicas", replicas, 1, cap), ("max_infra_retries", max_infra_retries, 0, 100)]
        if oversample is not None:
            checks.append(("oversample", oversample, replicas, cap))
        for name, value, low, high in checks:
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise SpecError(f"field '{name}': {guards.show(value)} must be a whole number from {low} to {high}",
                                field=name)  # fmt: skip
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not 0 < timeout <= 30 * guards.DAY):  # fmt: skip
            raise SpecError(f"field 'timeout': {guards.show(timeout)} must be a number of seconds above 0, or None",
                            field="timeout")  # fmt: skip
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not 0 <= grace <= 100:
            raise SpecError(f"field 'grace': {guards.show(grace)} must be a number from 0 to 100 (a fraction of "
                            "the group's k-th finish time)", field="grace")  # fmt: skip
        if policy_version is not None and not isinstance(policy_version, str):
            raise SpecError("field 'policy_version': must be a string", field="policy_version")
        tasks = _take(tasks, cap)
        if len(tasks) * (oversample or replicas) > cap:
            raise SpecError(f"field 'replicas': {len(tasks):,} tasks x {replicas} replicas is above "
                            f"MEGAFLOW_MAX_BATCH_EPISODES ({cap:,}); run fewer at a time or raise the setting",
                            field="replicas")  # fmt: skip
        return Rollout(
            self,
            replicas=replicas,
            user=user,
            policy_version=policy_version,
            max_infra_retries=max_infra_retries,
            timeout=timeout,
            trajectories=trajectories,
            oversample=oversample,
            grace=float(grace),
            priority=bool(priority),
        ).run(tasks)

    def resume(self, batch_id: str):
        """Re-run a batch's infra failures as a new batch; skip what finished. Returns a ResumeResult."""
        from megaflow.rollout import resume

        self._check_redis()
        self._refuse_person("resume")
        return resume(self, batch_id)

    def final_results(self, batch_id: str) -> list[dict[str, Any]]:
        """results() with re-runs (resume, rollout retries) in place of the episodes they replaced."""
        from megaflow.rollout import final_results

        self._refuse_person("final_results")
        return final_results(self, batch_id)

    # --- the control side of per-person requests --------------------------------------------------
    def serve_person(self, person: str, op: str, args: dict[str, Any]) -> Any:
        """Run one request of ``person`` (from their own stream) on this client's (the control's) connection."""
        if op == "submit":
            specs = args.get("specs")
            if not isinstance(specs, list):
                raise SpecError("field 'specs': must be a list of task specs", field="specs")
            sub = self.submit(specs, user=person, batch_id=args.get("batch_id"))
            return {"batch_id": sub.batch_id, "episode_ids": sub.episode_ids}
        if op == "trajectory":
            eid = args.get("episode_id")
            if not isinstance(eid, str) or not _EPISODE_ID.fullmatch(eid) or self._episode_owner(eid) != person:
                raise NotFoundError(f"episode {guards.show(eid)}: none of {person}'s episodes has that id")
            return self.trajectory(eid)
        bid = args.get("batch_id")
        if not self.owns(person, bid):
            raise NotFoundError(f"batch {guards.show(bid)}: none of {person}'s batches has that id")
        assert isinstance(bid, str)
        if op == "status":
            return self.status(bid)
        if op == "results":
            return self.results(bid)
        if op == "cancel":
            return self.cancel(bid)
        raise SpecError(f"op: {op!r} is not one of {', '.join(person_requests.OPS)}", field="op")

    def _episode_owner(self, episode_id: str) -> str | None:
        user = self.rt.redis.hget(self.rt.keys.episode(episode_id), "user")
        if user is None:
            user = (self.rt.metadata.get_task(episode_id) or {}).get("user")
        return user if isinstance(user, str) else None

    def close(self) -> None:
        self.rt.redis.close()
        if "metadata" in vars(self.rt):  # opened by a batch-id check
            self.rt.metadata.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_agents(specs: list[TaskSpec]) -> list[TaskSpec]:
    """Each spec's agent section checked against the agent registry (its own config too), normalised."""
    from megaflow.agents import validate_agent_section
    from megaflow.core.spec import AgentSpec

    out = []
    for i, spec in enumerate(specs):
        try:
            section = validate_agent_section(spec.agent.model_dump(exclude_defaults=True) | {"type": spec.agent.type})
        except SpecError as exc:
            raise SpecError(str(exc), index=i, field=exc.field) from None
        out.append(spec.model_copy(update={"agent": AgentSpec.model_validate(section)}))
    return out


def check_models(specs: list[TaskSpec], settings: Settings) -> None:
    """Reject, at submit, a model section its backend would refuse at run time (each backend validates its own)."""
    from megaflow.model_gateway.backends import validate_model_section

    for i, spec in enumerate(specs):
        try:
            validate_model_section(spec.model.model_dump(exclude_none=True), settings.model_backend)
        except SpecError as exc:
            raise SpecError(str(exc), index=i, field=exc.field) from None


def _take(specs: Any, cap: int) -> list[Any]:
    """The specs as a list, refusing more than ``cap`` (MEGAFLOW_MAX_BATCH_EPISODES) before reading them all."""
    if isinstance(specs, (dict, TaskSpec)):
        return [specs]
    if isinstance(specs, (str, bytes)) or not hasattr(specs, "__iter__"):
        raise SpecError(
            f"specs must be a task spec (dict) or a list of them, got {type(specs).__name__}", field="specs"
        )
    out = list(itertools.islice(iter(specs), cap + 1))
    if len(out) > cap:
        raise SpecError(
            f"field 'specs': more than {cap:,} specs in one batch (MEGAFLOW_MAX_BATCH_EPISODES); split it "
            "into several submits or raise the setting",
            field="specs",
        )
    return out


def check_limits(specs: list[TaskSpec], settings: Settings) -> None:
    """Reject, at submit, a spec larger than MEGAFLOW_MAX_SPEC_BYTES or with limits the fleet cannot honour."""
    longest = settings.step_time_limit_s - 30  # a step task is killed after step_time_limit_s
    for i, spec in enumerate(specs):
        size = len(spec.model_dump_json().encode())
        if size > settings.max_spec_bytes:
            dump = spec.model_dump(mode="json")
            big = max(dump, key=lambda k: len(json.dumps(dump[k])))
            raise SpecError(
                f"spec is {size:,} bytes, above MEGAFLOW_MAX_SPEC_BYTES ({settings.max_spec_bytes:,}); "
                f"its largest field is '{big}': make it smaller (or raise the setting)",
                index=i,
                field=big,
            )
        limits = (
            (
                "agent.command_timeout_s",
                spec.agent.command_timeout_s,
                longest,
                "the fleet's longest step (MEGAFLOW_COMMAND_TIMEOUT_S / MEGAFLOW_EVAL_TIMEOUT_S)",
            ),
            (
                "eval.timeout_s",
                spec.eval.timeout_s,
                longest,
                "the fleet's longest step (MEGAFLOW_COMMAND_TIMEOUT_S / MEGAFLOW_EVAL_TIMEOUT_S)",
            ),
            (
                "agent.wall_time_s",
                spec.agent.wall_time_s,
                settings.container_lifetime_s,
                "the container lifetime (MEGAFLOW_CONTAINER_LIFETIME_S)",
            ),
        )
        for name, value, limit, what in limits:
            if value is not None and value > limit:
                raise SpecError(
                    f"field '{name}': {value:g}s is above {what}, {limit:g}s; lower it, or raise "
                    "the setting on the fleet",
                    index=i,
                    field=name,
                )


def _new_batch_id() -> str:
    return f"b-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"


def _safe_url(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//***@", url)
