"""Sandboxes for frameworks with their own loop: created through the resource manager, run on an env host.

``SandboxService`` (any process: the HTTP server, a Python caller) admits a sandbox on the three
tiers, places it on a registered env host, and routes every operation to that host's Celery queue
(``env.<host>``, task ``megaflow.env.sandbox_op``) with the reply on a Redis list it BLPOPs, since
the env host owns the container. ``SandboxHostOps`` is the env host's side of one operation.

Keys owned (``S`` = ``<prefix>:sbx``): ``S:<id>`` hash {user, host, image, workdir, token, handle,
state, created}; ``S:<id>:sess`` hash SWE-ReX session name -> shell-session id; ``S:token:<sha256>``
-> id; ``S:index`` sorted set id -> idle deadline (ms, Redis time); ``S:op:<op>`` an operation's
request (read once by the host); ``S:reply:<op>`` its reply list. ``<prefix>:ep:<id>`` carries
``state=RUNNING`` and ``host`` while the sandbox lives, so its env host's reaper keeps the container.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
import uuid
from typing import TYPE_CHECKING, Any

from megaflow.core import wire
from megaflow.core.guards import USER_NAME, USER_RULE
from megaflow.sandbox import errors as E
from megaflow.sandbox import ops

if TYPE_CHECKING:
    from megaflow.services.root import Root

OP_KEY_TTL_S = 3600
REPLY_TTL_S = 600


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class SandboxKeys:
    """Key names of the sandbox API under one prefix."""

    def __init__(self, prefix: str):
        self.base = f"{prefix}:sbx"
        self.prefix = prefix

    def rec(self, sid: str) -> str:
        return f"{self.base}:{sid}"

    def sessions(self, sid: str) -> str:
        return f"{self.base}:{sid}:sess"

    def token(self, token: str) -> str:
        return f"{self.base}:token:{_sha(token)}"

    @property
    def index(self) -> str:
        return f"{self.base}:index"

    def op(self, op_id: str) -> str:
        return f"{self.base}:op:{op_id}"

    def reply(self, op_id: str) -> str:
        return f"{self.base}:reply:{op_id}"


class SandboxService:
    """Create, operate and close sandboxes (implements ``megaflow.sandbox.runtime.Transport``)."""

    def __init__(self, root: Root, *, idle_timeout_s: float = 600.0, reply_margin_s: float = 30.0, poll_s: float = 0.2):
        self.root = root
        self.redis = root.redis
        self.k = SandboxKeys(root.settings.key_prefix)
        self.idle_timeout_s = idle_timeout_s
        self.reply_margin_s = reply_margin_s
        self.poll_s = poll_s

    # --- create / close ---------------------------------------------------------------------------
    def create(self, *, user: str, image: str | None = None, workdir: str | None = None, wait_s: float = 0.0) -> dict:
        """Admit, place and start a sandbox; waits up to ``wait_s`` for a slot, else SandboxCapacityError."""
        if not isinstance(user, str) or not USER_NAME.fullmatch(user):
            raise E.SandboxRequestError(f"user must be {USER_RULE}, got {user!r}")
        s = self.root.settings
        image = image or s.default_image
        workdir = ops.resolve(workdir or "/work", "/")
        sid, token = f"sbx-{uuid.uuid4().hex[:16]}", secrets.token_urlsafe(24)
        deadline = time.monotonic() + max(0.0, wait_s)
        while True:
            host, why = self._place(sid, user, image)
            if host:
                break
            if time.monotonic() >= deadline:
                raise E.SandboxCapacityError(self._refusal(user, why, wait_s))
            self.sweep()
            time.sleep(self.poll_s)
        info = {"id": sid, "token": token, "host": host, "user": user, "image": image, "workdir": workdir}
        pipe = self.redis.pipeline()
        pipe.hset(
            self.k.rec(sid),
            mapping={
                "user": user,
                "host": host,
                "image": image,
                "workdir": workdir,
                "token": _sha(token),
                "state": "starting",
                "created": time.time(),
            },
        )
        pipe.set(self.k.token(token), sid)
        pipe.execute()
        self._touch(sid, host)
        try:
            handle = self._send(
                host,
                sid,
                "create",
                {"image": image, "workdir": workdir, "user": user},
                wait_s=s.boot_timeout_s + s.pull_timeout_s + self.reply_margin_s,
            )
        except BaseException:
            self._forget(sid, token)
            raise
        self.redis.hset(self.k.rec(sid), mapping={"handle": json.dumps(handle), "state": "open"})
        return info

    def close(self, sandbox_id: str, token: str) -> None:
        """Remove the container on its host, free the slots, forget the sandbox (idempotent for its owner)."""
        rec = self._auth(sandbox_id, token, missing_ok=True)
        if rec:
            self._teardown(sandbox_id, rec)

    def _teardown(self, sid: str, rec: dict) -> None:
        try:
            if rec.get("handle"):
                self._send(rec["host"], sid, "close", {}, wait_s=self.root.settings.command_timeout_s)
        except E.SandboxError:
            pass  # the reaper removes a container whose sandbox record is gone
        finally:
            self._forget(sid, None)

    def _forget(self, sid: str, token: str | None) -> None:
        sha = self.redis.hget(self.k.rec(sid), "token")
        pipe = self.redis.pipeline()
        pipe.delete(self.k.rec(sid), self.k.sessions(sid), self.root.keys.episode(sid))
        if sha:
            pipe.delete(f"{self.k.base}:token:{sha!s}")
        pipe.zrem(self.k.index, sid)
        pipe.execute()
        if not self.root.resources.release(sid):
            return  # nothing waits in the FIFO: no admission pass to run
        try:
            self.root.lifecycle.admit()  # a slot freed: queued episodes may start
        except Exception:
            self.root.resources.request_admission()

    def sweep(self) -> int:
        """Close sandboxes idle past their deadline (their client went away); returns how many."""
        now_s, now_us = self.redis.time()
        now = int(now_s) * 1000 + int(now_us) // 1000
        n = 0
        for raw in self.redis.zrangebyscore(self.k.index, "-inf", now):
            sid = str(raw)
            rec = self.redis.hgetall(self.k.rec(sid))
            if self.redis.zrem(self.k.index, sid):
                self._teardown(sid, rec) if rec else self._forget(sid, None)
                n += 1
        return n

    # --- operations -----------------------------------------------------------------------------
    def call(self, sandbox_id: str, token: str, op: str, request: dict, *, timeout: float | None = None) -> dict:
        """Run one SWE-ReX operation on the sandbox's env host and return its response."""
        rec = self._auth(sandbox_id, token)
        if rec.get("state") != "open":
            raise E.SandboxError(f"sandbox {sandbox_id} is {rec.get('state')}, not open")
        if not self.root.resources.renew(sandbox_id):
            self._teardown(sandbox_id, rec)
            raise E.SandboxLostError(
                f"sandbox {sandbox_id} lost its slot lease (its env host stopped beating); it is closed: open a new one"
            )
        limit = self.root.settings.step_time_limit_s - self.reply_margin_s
        if timeout is not None and not (isinstance(timeout, (int, float)) and 0 < timeout <= limit):
            raise E.SandboxRequestError(f"timeout must be a number of seconds in (0, {limit:g}], got {timeout!r}")
        self._touch(sandbox_id, rec["host"])
        if op == "is_alive":
            return {"is_alive": True, "message": ""}
        wait = (timeout or ops.DEFAULT_TIMEOUT_S) + self.reply_margin_s
        return self._send(rec["host"], sandbox_id, op, {"request": request}, wait_s=wait)

    def sandbox_for_token(self, token: str) -> str | None:
        """The id of the sandbox a token belongs to, if it is open."""
        sid = self.redis.get(self.k.token(token)) if token else None
        return str(sid) if sid else None

    def get(self, sandbox_id: str, token: str) -> dict:
        """The sandbox's public record ({id, host, user, image, workdir, state})."""
        rec = self._auth(sandbox_id, token)
        return {"id": sandbox_id, **{k: rec.get(k) for k in ("host", "user", "image", "workdir", "state")}}

    # --- helpers --------------------------------------------------------------------------------
    def _auth(self, sid: str, token: str, *, missing_ok: bool = False) -> dict[str, Any]:
        """The sandbox's record if ``token`` is its token ({} for a missing one with ``missing_ok``)."""
        rec: dict[str, Any] = {str(k): v for k, v in self.redis.hgetall(self.k.rec(sid)).items()} if sid else {}
        if not rec:
            if missing_ok:
                return {}
            raise E.SandboxNotFoundError(f"no open sandbox {sid!r} (closed, idle past its time-out, or never made)")
        if not isinstance(token, str) or not hmac.compare_digest(str(rec.get("token", "")), _sha(token)):
            raise E.SandboxAuthError(f"this token does not belong to sandbox {sid}")
        return rec

    def _touch(self, sid: str, host: str) -> None:
        """Push the idle deadline back; the episode view (state, host) tells the reaper the container is live."""
        now_s, _ = self.redis.time()
        ttl = int(self.idle_timeout_s) + 1
        pipe = self.redis.pipeline()
        pipe.zadd(self.k.index, {sid: (int(now_s) + ttl) * 1000})
        pipe.hset(self.root.keys.episode(sid), mapping={"state": "RUNNING", "kind": "sandbox", "host": host})
        pipe.expire(self.root.keys.episode(sid), ttl + 60)
        pipe.execute()

    def _place(self, sid: str, user: str, image: str) -> tuple[str | None, str]:
        hosts = [
            h for h in self.root.resources.hosts() if h["alive"] and not h["drained"] and h["used"] < h["capacity"]
        ]
        hosts.sort(key=lambda h: (image not in h["warm"], h["used"] / max(1, h["capacity"])))
        why = "no_host"
        for h in hosts:
            verdict = self.root.resources.acquire(sid, user, h["name"], image)
            if verdict == "ok":
                return h["name"], ""
            why = verdict
            if verdict in ("user", "global"):
                break
        return None, why

    def _refusal(self, user: str, why: str, wait_s: float) -> str:
        waited = f" within {wait_s:g}s" if wait_s else ""
        if why == "user":
            return (
                f"user {user!r} is at its limit of {self.root.resources.quota(user)} sandboxes and episodes "
                f"running at once{waited}: close one, pass a longer wait, or raise the quota "
                "(`megaflow quota`)"
            )
        if why == "global":
            return f"the fleet is at its global limit of {self.root.settings.global_limit}{waited}: wait or retry"
        return f"no registered env host has a free slot{waited} (see `megaflow capacity`): start env workers or wait"

    def _send(self, host: str, sid: str, op: str, payload: dict, *, wait_s: float) -> Any:
        op_id = uuid.uuid4().hex
        self.redis.set(self.k.op(op_id), json.dumps({"op": op, "sid": sid, **payload}), ex=OP_KEY_TTL_S)
        self.root.dispatcher.send(wire.ENV_SANDBOX_OP, [sid, op_id], wire.env_host_queue(host))
        got = self.redis.blpop([self.k.reply(op_id)], timeout=max(1, int(wait_s + 0.999)))
        if got is None:
            self.redis.delete(self.k.op(op_id))
            raise E.SandboxTimeoutError(f"env host {host} did not answer {op} on sandbox {sid} within {wait_s:g}s")
        reply = json.loads(got[1])
        if not reply.get("ok"):
            raise E.from_transfer(reply.get("error") or {})
        return reply.get("result")


class _RedisSessions:
    """``ops.Sessions`` on the sandbox's Redis hash: every worker of the host sees the same sessions."""

    def __init__(self, redis_client, key: str):
        self.r, self.key = redis_client, key

    def get(self, name: str) -> str | None:
        return self.r.hget(self.key, name)

    def put(self, name: str, session_id: str) -> bool:
        return bool(self.r.hsetnx(self.key, name, session_id))

    def pop(self, name: str) -> str | None:
        pipe = self.r.pipeline()
        pipe.hget(self.key, name)
        pipe.hdel(self.key, name)
        return pipe.execute()[0]


class SandboxHostOps:
    """The env host's side: carry out one operation and always push a reply (never strands a caller)."""

    def __init__(self, root: Root):
        self.root = root
        self.k = SandboxKeys(root.settings.key_prefix)

    def run(self, sandbox_id: str, op_id: str) -> str:
        r = self.root.redis
        pipe = r.pipeline()  # read-and-delete: a redelivered message finds nothing and does nothing twice
        pipe.get(self.k.op(op_id))
        pipe.delete(self.k.op(op_id))
        raw = pipe.execute()[0]
        if raw is None:
            return "dropped"
        try:
            result = {"ok": True, "result": self._do(sandbox_id, json.loads(raw))}
        except Exception as exc:
            result = {"ok": False, "error": E.to_transfer(exc)}
        pipe = r.pipeline()
        pipe.rpush(self.k.reply(op_id), json.dumps(result))
        pipe.expire(self.k.reply(op_id), REPLY_TTL_S)
        pipe.execute()
        return "ok" if result["ok"] else "error"

    def _do(self, sid: str, op: dict) -> Any:
        host = self.root.env_host
        name = op["op"]
        if name == "create":
            handle = host.create(
                sid,
                op["image"],
                labels={
                    "megaflow.run": "sandbox",
                    "megaflow.episode": sid,
                    "megaflow.user": op["user"],
                    "megaflow.host": self.root.host,
                    "megaflow.prefix": self.root.settings.key_prefix,
                },
                mode="ephemeral",
                network=False,
                workdir=op["workdir"],
            )
            return handle.to_json()
        rec = self.root.redis.hgetall(self.k.rec(sid))
        if not rec.get("handle"):
            raise E.SandboxNotFoundError(f"sandbox {sid} has no container on {self.root.host}")
        handle = json.loads(rec["handle"])
        if name == "close":
            host.close(handle)
            return {}
        sessions = _RedisSessions(self.root.redis, self.k.sessions(sid))
        return ops.apply(host, handle, name, op.get("request") or {}, sessions, workdir=str(rec.get("workdir") or "/"))
