"""Rollouts for trainers (groups of replicas, yielded as each completes) and resuming batches.

``Rollout.run(tasks)`` submits every task ``replicas`` times as one batch and watches the batch's
done set (``batch:{id}:done``; only its size is read until it grows), so finished groups are found
without polling every episode. An episode that failed for infrastructure reasons is resubmitted
(a new episode id, in a batch ``{root}-retry{n}``) up to ``max_infra_retries`` times; a group with
an episode still failing after that is yielded with ``masked: true`` so a trainer can drop it.

``resume(client, batch_id)`` re-runs what a batch lost to the infrastructure: episodes that
finished (succeeded, or failed for the task's own reasons) are skipped, live ones are left alone,
infra failures are resubmitted in a batch ``{root}-resume{n}``.

Keys written (besides what Client.submit writes): fields on the root batch's hash
``batch:{root}`` -- ``rerun:{episode_id}`` (the latest episode re-running it), ``retries`` and
``resumes`` (counters naming the re-run batches) -- and ``rerun_of`` on each re-run batch's hash.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from megaflow.core import states
from megaflow.core.spec import TaskSpec, validate_specs
from megaflow.engine.episodes import TRAJECTORY_PRIORITY

log = logging.getLogger(__name__)


def rerun_field(episode_id: str) -> str:
    return f"rerun:{episode_id}"


def is_infra_failure(view: dict[str, Any]) -> bool:
    return view.get("state") in states.TERMINAL and view.get("cause") == states.CAUSE_INFRA


def latest_attempts(client, batch_id: str) -> dict[str, str]:
    """Original episode id -> the episode id of its latest run (itself when never re-run)."""
    ids = client.rt.engine.batch_ids(batch_id)
    meta = client.rt.redis.hgetall(client.rt.keys.batch(batch_id))
    return {eid: meta.get(rerun_field(eid), eid) for eid in ids}


_RERUN_KINDS = {"retry": "retries", "resume": "resumes"}  # batch-name word -> counter field


def _rerun(client, root: str, kind: str, specs: list[TaskSpec], originals: list[str], user: str):
    """Submit ``specs`` as a re-run batch of ``root`` and link each original episode to its new one."""
    n = client.rt.redis.hincrby(client.rt.keys.batch(root), _RERUN_KINDS[kind], 1)
    sub = client.submit(specs, user=user, batch_id=f"{root}-{kind}{n}")
    pipe = client.rt.redis.pipeline(transaction=True)
    pipe.hset(client.rt.keys.batch(root), mapping={rerun_field(o): e for o, e in zip(originals, sub.episode_ids)})
    pipe.hset(client.rt.keys.batch(sub.batch_id), "rerun_of", root)
    pipe.execute()
    return sub


@dataclass
class ResumeResult:
    """What a resume did: the re-run batch (None when nothing needed it) and the counts."""

    batch_id: str
    rerun_batch: str | None = None
    resubmitted: dict[str, str] = field(default_factory=dict)  # original episode id -> new episode id
    skipped_finished: int = 0
    still_running: int = 0
    missing: int = 0  # expired from Redis (older than the episode TTL): cannot be re-run from here


def resume(client, batch_id: str) -> ResumeResult:
    """Re-run the infra failures of a batch (their latest attempts); skip what finished or still runs."""
    latest = latest_attempts(client, batch_id)
    views = {v["episode_id"]: v for v in client.rt.engine.summaries(list(latest.values()))}
    out = ResumeResult(batch_id)
    infra: list[str] = []
    for orig, eid in latest.items():
        v = views.get(eid)
        if v is None:
            out.missing += 1
        elif v["state"] not in states.TERMINAL:
            out.still_running += 1
        elif is_infra_failure(v):
            infra.append(orig)
        else:
            out.skipped_finished += 1
    if not infra:
        return out
    engine = client.rt.engine
    specs = [engine.load(latest[o], history=False).spec for o in infra]
    user = client.rt.redis.hget(client.rt.keys.batch(batch_id), "user") or "default"
    sub = _rerun(client, batch_id, "resume", specs, infra, user)
    out.rerun_batch = sub.batch_id
    out.resubmitted = dict(zip(infra, sub.episode_ids))
    return out


def final_results(client, batch_id: str) -> list[dict[str, Any]]:
    """Client.results with every re-run episode in its original's place (``original_episode_id`` added)."""
    latest = latest_attempts(client, batch_id)
    views = {v["episode_id"]: v for v in client.rt.engine.summaries(list(latest.values()))}
    out = []
    for orig, eid in latest.items():
        if eid in views:
            out.append(dict(views[eid], original_episode_id=orig))
    return out


class RolloutRun:
    """The groups of a submitted rollout, in completion order; ``batch_id`` is known at once."""

    def __init__(self, batch_id: str, groups: Iterator[dict[str, Any]]):
        self.batch_id = batch_id
        self._groups = groups

    def __iter__(self) -> RolloutRun:
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self._groups)


@dataclass
class _Slot:
    group: int
    replica: int
    episode_id: str
    spec: TaskSpec
    attempts: int = 1
    earlier: list[str] = field(default_factory=list)
    result: dict[str, Any] | None = None


def _t(view: dict[str, Any], phase: str) -> float | None:
    t = (view.get("phases") or {}).get(phase)
    return float(t) if t is not None else None


def choose_kept(members: list[_Slot], keep: int, grace: float, now: float) -> list[_Slot] | None:
    """The kept subset of an over-sampled group, or None while the group must wait (see GROUP RULE)."""
    usable = sorted(
        (s for s in members if s.result is not None and not is_infra_failure(s.result)), key=lambda s: s.replica
    )
    lost = sum(1 for s in members if s.result is not None and is_infra_failure(s.result))
    if all(s.result is not None for s in members):
        return usable[:keep]  # nothing left to wait for
    if len(members) - lost < keep and len(members) > keep:
        return usable[:keep]  # an over-sampled group that can no longer reach k: masked, cancel the rest now
    if len(usable) < keep:
        return None
    ends = sorted(t for s in usable if (t := _t(s.result or {}, "finished")) is not None)
    starts = [t for s in usable if (t := _t(s.result or {}, "admitted")) is not None]
    if len(ends) >= keep and starts:
        t_k = ends[keep - 1]
        if now < t_k + grace * max(0.0, t_k - min(starts)):
            return None
    return usable[:keep]


class Rollout:
    """Submit groups of replicas and yield each group once it is complete.

    GROUP RULE (over-sampling, ``oversample`` n > ``replicas`` k): a group of n replicas closes at its
    deadline ``T_k + grace * (T_k - start)`` (T_k: when its k-th replica finished; start: its first
    admission) or when all n are final, whichever is first; it keeps the k lowest replica indices
    (submission order) among those finished by then, and cancels the rest at once (their slots free
    for other groups). Keeping the first k *to finish* would favour fast trajectories: when duration
    and reward are correlated (an agent that submits early, one that loops until a limit), the
    group's mean reward and its GRPO baseline would be biased toward short trajectories. Choosing by
    submission index among all finished by the deadline makes the kept set independent of finish
    order; only replicas slower than the deadline (the extreme tail, ``grace`` times the typical
    duration later) are censored, and each group reports how many (``censored``). ``grace=0``
    degenerates to first-k-to-finish. With n == k nothing is cancelled: a group waits for all.

    Trajectory priority (``priority=True``, after Heddle, arXiv 2603.28101): every episode's model
    steps go to the broker with a priority that grows with its completed model calls, so a busy
    model pool serves trajectories further along first. Admission is FIFO by submission order, and a
    rollout submits group by group, so older groups are admitted first already.
    """

    def __init__(
        self,
        client,
        *,
        replicas: int = 1,
        user: str = "rollout",
        policy_version: str | None = None,
        max_infra_retries: int = 2,
        timeout: float | None = None,
        poll_s: float = 0.2,
        trajectories: bool = True,
        oversample: int | None = None,
        grace: float = 0.5,
        priority: bool = False,
    ):
        if replicas < 1:
            raise ValueError("replicas must be at least 1")
        if oversample is not None and oversample < replicas:
            raise ValueError(f"oversample ({oversample}) must be at least replicas/keep ({replicas})")
        if grace < 0:
            raise ValueError("grace must be 0 or more")
        self.client = client
        self.replicas = replicas
        self.oversample = oversample or replicas
        self.grace = grace
        self.priority = priority
        self.user = user
        self.policy_version = policy_version
        self.max_infra_retries = max_infra_retries
        self.timeout = timeout
        self.poll_s = poll_s
        self.trajectories = trajectories
        self.batch_id: str | None = None

    def _specs(self, tasks: Iterable[Any]) -> list[TaskSpec]:
        from megaflow.datasets import to_specs

        specs = validate_specs(to_specs(list(tasks)))
        if self.policy_version:
            specs = [s.model_copy(update={"policy_version": self.policy_version}) for s in specs]
        return specs

    def replica_spec(self, spec: TaskSpec, group: int, replica: int) -> TaskSpec:
        """The spec replica ``replica`` of group ``group`` runs (a subclass may vary it per replica)."""
        extra = {"priority": TRAJECTORY_PRIORITY} if self.priority else {}
        return spec.model_copy(update={"metadata": {**spec.metadata, **extra, "group": group, "replica": replica}})

    def run(self, tasks: Iterable[Any]) -> RolloutRun:
        """Submit now (a bad task raises here); return an iterator of groups in completion order."""
        specs = self._specs(tasks)
        n = self.oversample
        payload = [self.replica_spec(s, g, r) for g, s in enumerate(specs) for r in range(n)]
        sub = self.client.submit(payload, user=self.user)
        root = self.batch_id = sub.batch_id
        slots = {eid: _Slot(i // n, i % n, eid, payload[i]) for i, eid in enumerate(sub.episode_ids)}
        groups: dict[int, list[_Slot]] = {}
        for slot in slots.values():
            groups.setdefault(slot.group, []).append(slot)
        return RolloutRun(root, self._watch(root, slots, groups, {root: set(sub.episode_ids)}))

    def _watch(
        self, root: str, slots: dict[str, _Slot], groups: dict[int, list[_Slot]], watch: dict[str, set[str]]
    ) -> Iterator[dict[str, Any]]:
        seen = {bid: 0 for bid in watch}
        r, keys, engine = self.client.rt.redis, self.client.rt.keys, self.client.rt.engine
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while groups:
            retry: list[_Slot] = []
            for bid, open_ids in list(watch.items()):
                n = r.scard(keys.batch_done(bid))
                if n <= seen[bid]:
                    continue
                seen[bid] = n
                finished = sorted(set(r.smembers(keys.batch_done(bid))) & open_ids)
                for view in engine.summaries(finished):
                    open_ids.discard(view["episode_id"])
                    slot = slots[view["episode_id"]]
                    if slot.group not in groups:  # cancelled by its group's close
                        slot.result = view
                    elif is_infra_failure(view) and slot.attempts <= self.max_infra_retries:
                        retry.append(slot)
                    else:
                        slot.result = view
                if not open_ids:
                    del watch[bid]
            if retry:
                new = _rerun(
                    self.client,
                    root,
                    "retry",
                    [s.spec for s in retry],
                    [s.earlier[0] if s.earlier else s.episode_id for s in retry],
                    self.user,
                )
                for slot, eid in zip(retry, new.episode_ids):
                    log.info(
                        "rollout %s: group %s replica %s failed for infra; retrying as %s",
                        root,
                        slot.group,
                        slot.replica,
                        eid,
                    )
                    slot.earlier.append(slot.episode_id)
                    slot.episode_id, slot.attempts = eid, slot.attempts + 1
                    slots[eid] = slot
                watch[new.batch_id] = set(new.episode_ids)
                seen[new.batch_id] = 0
            now = time.time()
            done = {
                g: kept
                for g, members in groups.items()
                if (kept := choose_kept(members, self.replicas, self.grace, now)) is not None
            }
            for g in sorted(done):
                yield self._close(root, g, groups.pop(g), done[g])
            if not done and not retry:
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"rollout {root}: {len(groups)} groups unfinished after {self.timeout}s")
                time.sleep(self.poll_s)

    def _close(self, root: str, g: int, members: list[_Slot], kept: list[_Slot]) -> dict[str, Any]:
        """Cancel the group's unfinished replicas (freeing their slots now) and build its record."""
        lifecycle = self.client.rt.lifecycle
        open_slots = [s for s in members if s.result is None]
        cancelled = [s.episode_id for s in open_slots if lifecycle.cancel(s.episode_id)]
        if open_slots:
            lifecycle.admit()
        kept_ids = {s.episode_id for s in kept}
        dropped = [s.episode_id for s in members if s.result is not None and s.episode_id not in kept_ids]
        group = self._group(
            root,
            g,
            kept
            if len(kept) >= self.replicas
            else kept
            + [s for s in members if s.result is not None and is_infra_failure(s.result)][: self.replicas - len(kept)],
        )
        group.update(
            oversample=self.oversample,
            kept=[s.replica for s in kept],
            cancelled=cancelled,
            dropped=dropped,
            censored=len(open_slots),
        )
        if len(kept) < self.replicas:
            group.update(
                masked=True,
                mask_reason=group["mask_reason"] or f"only {len(kept)} of {self.replicas} replicas finished",
            )
        return group

    def _group(self, root: str, g: int, members: list[_Slot]) -> dict[str, Any]:
        members = sorted(members, key=lambda s: s.replica)
        episodes = [self._episode(s) for s in members]
        masked = any(e["cause"] == states.CAUSE_INFRA for e in episodes)
        return {
            "group_id": f"{root}/g{g:05d}",
            "batch_id": root,
            "index": g,
            "task_id": members[0].spec.task_id,
            "policy_version": members[0].spec.policy_version or self.client.settings.policy_version,
            "replicas": self.replicas,
            "masked": masked,
            "mask_reason": (f"infrastructure failure after {self.max_infra_retries} retries" if masked else None),
            "rewards": [e["reward"] for e in episodes],
            "episodes": episodes,
        }

    def _episode(self, slot: _Slot) -> dict[str, Any]:
        v = slot.result or {}
        infra = is_infra_failure(v)
        reward = v.get("reward")
        out = {
            "episode_id": slot.episode_id,
            "replica": slot.replica,
            "attempts": slot.attempts,
            "retried_from": list(slot.earlier),
            "state": v.get("state"),
            "reward": None if infra else (reward if reward is not None else 0.0),
            "cause": v.get("cause"),
            "error": v.get("error"),
            "steps": v.get("steps"),
            "prompt_tokens": v.get("prompt_tokens"),
            "completion_tokens": v.get("completion_tokens"),
            "artifact_uri": v.get("artifact_uri"),
        }
        if self.trajectories and v.get("artifact_uri"):
            try:
                traj = json.loads(self.client.rt.artifacts.get_bytes(v["artifact_uri"]))
            except Exception as exc:  # a missing artifact should not lose the whole group
                out["trajectory_error"] = str(exc)
            else:
                out.update(
                    messages=traj.get("messages"),
                    tokens=traj.get("tokens"),
                    report=traj.get("report"),
                    trajectory_steps=traj.get("steps"),
                )
        return out
