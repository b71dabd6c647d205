"""One settings model for every MegaFlow process.

Read once in an entry point (``Settings.load()``) from ``MEGAFLOW_*`` environment variables and,
when ``MEGAFLOW_CONFIG`` names one, a YAML file (environment wins over the file). Clients are
built from it in entry points or worker start-up, never at import time.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict


def _default_state_dir() -> str:
    return str(Path(os.environ.get("HOME", "/tmp")) / ".megaflow")


def _check_env_backend(v: dict[str, Any]) -> dict[str, Any]:
    """A plain check of ``type``; the backend's own config is validated by megaflow.env_hosts.config."""
    kind = v.get("type")
    if not isinstance(kind, str) or not (kind in ("docker", "sim") or "." in kind or ":" in kind):
        raise ValueError(
            "env_backend needs a 'type': 'docker', 'sim' or a dotted path like 'mypkg.mymod:MyHost' "
            '(MEGAFLOW_ENV_BACKEND=\'{"type": "sim"}\')'
        )
    return v


def _default_host_name() -> str:
    """This machine's host name made safe for a queue name and a Docker label (other characters: '-')."""
    import re

    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()).lstrip("._-")[:63]
    return name or "localhost"


class Settings(BaseSettings):
    """Fleet-wide settings. Every field maps to ``MEGAFLOW_<FIELD>`` (upper case)."""

    # env_ignore_empty: an empty MEGAFLOW_X means unset (the default); allow_inf_nan: no inf/NaN numbers
    model_config = SettingsConfigDict(
        env_prefix="MEGAFLOW_", extra="forbid", validate_default=True, env_ignore_empty=True, allow_inf_nan=False
    )

    # --- connections -------------------------------------------------------------------------
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis used as Celery broker, episode state, semaphores and event stream. "
        "Put the password in the URL (redis://:PASSWORD@host:6379/0).",
    )
    key_prefix: str = Field("mf", description="Prefix of every Redis key MegaFlow owns.")
    state_dir: str = Field(
        default_factory=_default_state_dir,
        description="Local directory for the embedded stores, fleet pid files and logs.",
    )
    metadata_url: str = Field(
        "",
        description="Metadata store: sqlite:///PATH (default: STATE_DIR/megaflow.db) or "
        "mongodb://user:pass@host:27017/megaflow.",
    )
    artifacts_url: str = Field(
        "",
        description="Artifact store: file:///DIR (default: STATE_DIR/artifacts) or s3://bucket/prefix.",
    )
    s3_endpoint_url: str | None = Field(
        None, description="S3 endpoint for MinIO or other S3-compatible stores (None: AWS)."
    )
    s3_region: str | None = Field(
        None, description="S3 region (None: boto3's usual AWS_REGION / ~/.aws/config lookup)."
    )
    mongo_ttl_days: float | None = Field(
        None, description="If set, MongoDB event documents expire after this many days (TTL index)."
    )

    # --- workers -----------------------------------------------------------------------------
    host_name: str = Field(
        default_factory=_default_host_name,
        description="Name of this env host; its env worker consumes queue env.<host_name>.",
    )
    model_concurrency: int = Field(32, ge=1, description="Threads per model-gateway worker.")
    agent_concurrency: int = Field(
        8, ge=1, description="Threads (or processes, with agent_pool=prefork) per agent worker."
    )
    agent_pool: Literal["threads", "prefork"] = Field(
        "threads",
        description="Agent worker pool: threads (no IPC per task; decisions are short) or prefork "
        "(a process per slot, for CPU-heavy custom agents).",
    )
    agent_inline: bool = Field(
        False,
        description="Let agents that declare a cheap decision (inline = True: the built-in bash and mini "
        "agents) decide in the model or env worker, in the same advance as the step they react to, instead "
        "of as an agent-service task: ~40% fewer Celery tasks per episode. Off: every decision is an "
        "agent-service task.",
    )
    env_concurrency: int = Field(8, ge=1, description="Threads per env worker.")
    redis_max_connections: int = Field(
        512,
        ge=16,
        le=100_000,
        description="Most Redis connections one process opens: its threads share them and wait for a free "
        "one (a model worker with thousands of threads in model calls needs far fewer).",
    )
    task_events: bool = Field(
        True,
        description="Workers send Celery task events (Flower shows tasks from them); off saves a few "
        "Redis publishes per step.",
    )
    task_log: bool = Field(
        False,
        description="Workers log each task's receipt and success at INFO (Celery's two lines per step, a few "
        "percent of a worker's CPU at scale); failures and retries are logged either way.",
    )
    visibility_timeout_s: int = Field(
        0,
        ge=0,
        description="Redis broker visibility timeout; 0 derives it from the longest step time "
        "limit plus a margin (it must stay above it, or Celery redelivers running tasks).",
    )

    # --- resource manager --------------------------------------------------------------------
    global_limit: int = Field(64, ge=1, description="Episodes running at once in the whole fleet.")
    user_limit: int = Field(
        16, ge=1, description="Default episodes running at once per user (override: megaflow quota set)."
    )
    host_capacity: int = Field(8, ge=1, description="Live episode containers per env host.")
    boot_concurrency: int = Field(4, ge=1, description="Containers being created at the same time on one env host.")
    boot_rate_per_s: float | None = Field(
        None, description="Optional cap on container creations started per second per host."
    )
    lease_s: float = Field(
        60.0, gt=0, description="Semaphore lease length; a holder that stops renewing loses its slots after this."
    )
    host_ttl_s: float = Field(30.0, gt=0, description="An env host whose heartbeat is older than this is removed.")
    sweep_interval_s: float = Field(15.0, gt=0, description="Period of the safety sweep.")
    admit_start_timeout_s: float = Field(
        600.0, gt=0, description="The sweep re-queues an episode admitted but not started within this."
    )

    # --- faults: stalled episodes, lost hosts ----------------------------------------------------
    stall_timeout_s: float = Field(
        60.0,
        gt=0,
        description="The sweep re-sends the next task of a live episode that made no progress for "
        "this long and has no task queued or running (a message lost with Redis's last writes).",
    )
    infra_max_attempts: int = Field(
        3, ge=1, description="Attempts of an episode whose env host was lost; past them it ends FAILED (infra)."
    )

    # --- environments ------------------------------------------------------------------------
    env_mode: Literal["ephemeral", "persistent"] = Field(
        "ephemeral", description="Default environment mode for episodes that do not set one."
    )
    default_image: str = Field("megaflow-sandbox:latest", description="Image used when a task names none.")
    warm_pool_size: int = Field(2, ge=0, description="Warm containers kept per image per host (persistent mode).")
    warm_idle_s: float = Field(900.0, gt=0, description="A warm container idle longer than this is removed.")
    container_cpus: float = Field(1.0, gt=0, description="CPU limit of each episode container.")
    container_memory: str = Field("1g", description="Memory limit of each episode container (docker syntax).")
    container_pids: int = Field(256, ge=16, description="Process limit of each episode container.")
    output_cap_bytes: int = Field(16384, ge=256, description="Command output kept per exec (head+tail).")
    image_disk_budget_gb: float = Field(40.0, gt=0, description="Disk used by images per env host before LRU eviction.")
    registry_url: str | None = Field(None, description="Registry to log in to before pulls.")
    registry_username: str | None = Field(None, description="Registry user.")
    registry_password: SecretStr | None = Field(None, description="Registry password or token.")

    # --- env backend (megaflow.env_hosts.config) ---------------------------------------------------
    env_backend: Annotated[dict[str, Any], AfterValidator(_check_env_backend)] = Field(
        default_factory=lambda: {"type": "docker"},
        description="Env backend and its config: {type: docker} (default), {type: sim, ...} (no containers; "
        "fields in megaflow/env_hosts/sim_config.py, e.g. {type: sim, preset: demo}) or {type: "
        "'mypkg.mymod:MyHost', ...}. As an environment variable: JSON.",
    )

    # --- elastic fleet (megaflow.elastic.config) -----------------------------------------------------
    elastic: dict[str, Any] = Field(
        default_factory=dict,
        description="Autoscaler, provider, automatic mode and prices: {min_hosts: 1, max_hosts: 8, provider: "
        "{type: local}, prices: {local: 0.0}, ...}; fields in megaflow/elastic/config.py (empty: off). "
        "As an environment variable: JSON.",
    )

    # --- containment (megaflow.env_hosts.disk, containers) ----------------------------------------
    container_disk: str = Field(
        "10g",
        pattern=r"^\s*(0|\d+(\.\d+)?\s*[kKmMgGtT]?[bB]?)?\s*$",
        description="Disk a container may write (its whole writable layer), e.g. 10g; 0 or empty: no limit.",
    )
    container_disk_mode: Literal["auto", "storage-opt", "loop", "off"] = Field(
        "auto",
        description="How the disk limit is enforced: storage-opt (overlay2 on xfs with pquota, btrfs, zfs), loop "
        "(overlay2 on any fs: the layer on a sized loop-mounted ext4 file; env worker as root), auto (the first "
        "that works here), off.",
    )
    container_disk_dir: str = Field(
        "", description="Where loop-mode disk files live (default: DOCKER_ROOT/megaflow-disks; sparse files)."
    )
    container_read_only: bool = Field(
        False,
        description="Episode containers get a read-only root file system: only container_writable_dirs (and the "
        "user's HOME) are writable, as tmpfs of container_disk each, counted in container_memory. Off by default: "
        "SWE-bench images and package installs write into the image (/testbed, site-packages).",
    )
    container_writable_dirs: str = Field(
        "/tmp,/repo",
        pattern=r"^\s*/[A-Za-z0-9_./-]*(\s*,\s*/[A-Za-z0-9_./-]*)*\s*$",
        description="With container_read_only: the writable directories (comma-separated absolute paths); a task's "
        "workdir must be one of them or below one.",
    )
    container_user: str = Field(
        "1000:1000",
        pattern=r"^(root|\d{1,9}(:\d{1,9})?)$",
        description="User commands run as in a container: UID[:GID] (unprivileged; owns its HOME and the work "
        "dir) or root (only for tasks that need it; root keeps just the capabilities package installs need).",
    )

    gateway_socket_dir: str = Field(
        "",
        description="Host directory for the per-episode model gateway's Unix socket; each env host serves it in "
        "DIR/<host>/gateway.sock and mounts DIR/<host> read-only at /run/megaflow in its containers, where a "
        "loopback relay gives installed agents OPENAI_BASE_URL (default: STATE_DIR/gateway; off: no socket).",
    )
    gateway_max_calls: int = Field(
        0,
        ge=0,
        description="Chat completions the per-episode gateway answers at once per server (each waiting call holds "
        "one thread); one more is refused with 429 and Retry-After (0: 4 x host_capacity).",
    )

    # --- time limits (command < agent budget < container lifetime < episode guard) -------------
    command_timeout_s: float = Field(60.0, gt=0, description="Time limit of one shell command in a container.")
    eval_timeout_s: float = Field(300.0, gt=0, description="Time limit of the evaluation command.")
    episode_budget_s: float = Field(1800.0, gt=0, description="Agent wall-time budget per episode.")
    container_lifetime_s: float = Field(
        2400.0, gt=0, description="A container's main process ends by itself after this (dead-man's switch)."
    )
    episode_guard_s: float = Field(3000.0, gt=0, description="The sweep times out an episode still live after this.")
    pull_timeout_s: float = Field(900.0, gt=0, description="Deadline of one image pull.")
    boot_timeout_s: float = Field(120.0, gt=0, description="Deadline of creating and starting a container.")
    max_steps: int = Field(50, ge=1, description="Default agent step limit per episode.")

    # --- model service -----------------------------------------------------------------------
    model_backend: str = Field("scripted", description="Default model backend: scripted or openai.")
    model_name: str = Field("default", description="Model name sent to OpenAI-compatible endpoints.")
    model_endpoints: Annotated[list[str], NoDecode] = Field(  # NoDecode: comma lists reach the validator
        default_factory=list,
        description="OpenAI-compatible base URLs (comma separated or JSON list), e.g. http://gpu1:8000/v1.",
    )
    model_api_key: SecretStr | None = Field(None, description="API key sent as Bearer token.")
    endpoint_concurrency: int = Field(64, ge=1, description="Requests in flight per model endpoint.")
    model_timeout_s: float = Field(120.0, gt=0, description="Time limit of one model request.")
    model_max_retries: int = Field(5, ge=0, description="Retries on 429/5xx/connection errors/time-outs.")
    policy_version: str | None = Field(None, description="Default policy version tag sent with requests.")
    model_backoff_base_s: float = Field(
        0.5, gt=0, description="First retry delay of a model request; doubles each retry, with jitter."
    )
    model_backoff_max_s: float = Field(8.0, gt=0, description="Longest delay between two model request retries.")
    model_unhealthy_after: int = Field(
        3, ge=1, description="Consecutive failures after which a model endpoint is taken out of the pool."
    )
    model_cooldown_s: float = Field(
        15.0, gt=0, description="How long an unhealthy model endpoint stays out before it is probed back in."
    )
    model_sticky_ttl_s: float = Field(
        3600.0, gt=0, description="How long an episode keeps its model endpoint after its last call."
    )
    model_endpoint_ttl_s: float = Field(
        30.0,
        gt=0,
        description="A registered model endpoint (`megaflow model serve`) whose heartbeat is older "
        "than this leaves the pool.",
    )
    # model errors and retries (megaflow.model_gateway.openai): one budget per model call, counted once
    model_retry_budget_s: float = Field(
        600.0,
        gt=0,
        description="Total seconds one model call may take: every attempt, backoff and wait for an "
        "endpoint slot; with model_max_retries + 1 attempts, the one retry budget (no other layer retries).",
    )
    model_stream: bool = Field(
        True,
        description="Stream replies (SSE) and reassemble them, so long generations are not cut by the read "
        "time-out (model_timeout_s then limits the silence between chunks); a spec's model.stream overrides.",
    )
    model_auth_block_s: float = Field(
        3600.0,
        gt=0,
        description="How long an endpoint that refused the credentials (401/403) stays unused by "
        "the batch that got the refusal.",
    )

    # --- monitoring --------------------------------------------------------------------------
    flower_port: int = Field(5555, description="Port of `megaflow flower`.")
    flower_address: str = Field(
        "127.0.0.1", description="Address `megaflow flower` listens on (0.0.0.0 to reach it from other machines)."
    )
    flower_user: str | None = Field(None, description="Flower basic-auth user.")
    flower_password: SecretStr | None = Field(None, description="Flower basic-auth password.")
    metrics_port: int = Field(
        9808,
        ge=0,
        description="Port of the Prometheus metrics endpoint (`megaflow metrics`, and the one "
        "the control service starts; 0: the control service starts none).",
    )
    metrics_address: str = Field(
        "127.0.0.1",
        description="Address the metrics endpoint listens on (0.0.0.0 for a remote Prometheus; any address "
        "but loopback needs metrics_user and metrics_password).",
    )
    metrics_user: str | None = Field(
        None, description="Metrics endpoint basic-auth user (required when it listens beyond loopback)."
    )
    metrics_password: SecretStr | None = Field(None, description="Metrics endpoint basic-auth password.")
    events_maxlen: int = Field(1_000_000, ge=1000, description="Approximate cap of the event stream.")
    events_retain_s: float = Field(
        0.0,
        ge=0,
        description="Seconds a recorded event stays in the Redis stream (0: trimmed once every consumer group "
        "acknowledged it; the metadata store keeps it).",
    )

    @field_validator("model_endpoints", mode="before")
    @classmethod
    def _split_endpoints(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = v.strip()
            if v.startswith("["):
                import json

                try:
                    return json.loads(v)
                except ValueError as exc:
                    raise ValueError(f'not a valid JSON list ({exc}); use a, b or ["a", "b"]') from None
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        if not self.metadata_url:
            self.metadata_url = f"sqlite:///{Path(self.state_dir) / 'megaflow.db'}"
        if not self.artifacts_url:
            self.artifacts_url = f"file://{Path(self.state_dir) / 'artifacts'}"
        if self.visibility_timeout_s == 0:
            self.visibility_timeout_s = int(self.step_time_limit_s * 2 + 60)
        elif self.visibility_timeout_s <= self.step_time_limit_s:
            raise ValueError(
                f"MEGAFLOW_VISIBILITY_TIMEOUT_S={self.visibility_timeout_s} must be above the longest step "
                f"time limit ({self.step_time_limit_s:.0f}s); raise MEGAFLOW_VISIBILITY_TIMEOUT_S or set it to 0"
            )
        chain = ("command_timeout_s", "episode_budget_s", "container_lifetime_s", "episode_guard_s")
        if not (self.command_timeout_s < self.episode_budget_s < self.container_lifetime_s < self.episode_guard_s):
            now = ", ".join(f"MEGAFLOW_{n.upper()}={getattr(self, n):g}" for n in chain)
            raise ValueError(
                f"time limits must line up: {' < '.join('MEGAFLOW_' + n.upper() for n in chain)} "
                f"(now {now}); change the one out of order"
            )
        return self

    @property
    def fleet_id(self) -> str:
        """Identifies this fleet (Redis + key prefix) on shared Docker engines: the reaper touches only its own."""
        import hashlib
        import re

        where = re.sub(r"//[^@/]*@", "//", self.redis_url)
        return f"{self.key_prefix}-{hashlib.sha1(where.encode()).hexdigest()[:10]}"

    @property
    def step_time_limit_s(self) -> float:
        """Hard time limit of the longest single step task (plus slack for bookkeeping)."""
        return (
            max(
                self.command_timeout_s,
                self.eval_timeout_s,
                min(self.model_retry_budget_s, self.model_timeout_s * (self.model_max_retries + 1)),
                self.boot_timeout_s + self.pull_timeout_s,
            )
            + 30
        )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = os.environ.get("MEGAFLOW_CONFIG")
        if path:
            from pydantic_settings import YamlConfigSettingsSource

            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)

    @classmethod
    def load(cls, **overrides: Any) -> Settings:
        """Build settings from the environment (and MEGAFLOW_CONFIG YAML), with explicit overrides.

        A bad value, an unknown MEGAFLOW_* variable or a bad MEGAFLOW_CONFIG file raises one
        SettingsError naming the variable, the value and the fix (see megaflow.core.settings_guard).
        """
        from megaflow.core import settings_guard

        return settings_guard.load(cls, overrides)

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process."""
        import json

        out: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            if isinstance(value, (list, dict)):
                value = json.dumps(value)
            out[f"MEGAFLOW_{name.upper()}"] = str(value)
        for name in ("model_api_key", "registry_password", "flower_password", "metrics_password"):
            secret = getattr(self, name)
            if secret is not None:
                out[f"MEGAFLOW_{name.upper()}"] = secret.get_secret_value()
        return out

    # --- bad input (issue 17): caps, bounds and safe names; the checks live in settings_guard ------
    max_batch_episodes: int = Field(
        10_000, ge=1, description="Most episodes one submit may hold; a bigger batch is refused (split it)."
    )
    max_spec_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest task spec (as JSON) a submit accepts, in bytes."
    )
    max_task_file_bytes: int = Field(
        512 * 1024 * 1024, ge=1024, description="Largest task file (JSONL) `megaflow submit` / `rollout` read."
    )

    @field_validator("*")
    @classmethod
    def _guard(cls, value: Any, info: ValidationInfo) -> Any:
        from megaflow.core.settings_guard import check_setting

        return check_setting(info.field_name or "", value)
