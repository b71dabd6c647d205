"""The ``elastic`` settings block: autoscaler bounds, provider, automatic mode and instance prices.

``Settings.elastic`` is a plain dict (an empty one turns the autoscaler off); ``ElasticConfig.from_settings``
validates it with a message naming the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from megaflow.core.errors import ConfigError


class LocalProviderConfig(BaseModel):
    """Env workers started as processes on this machine (test hosts; use the ``sim`` env backend)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["local"] = "local"
    name_prefix: str = Field("elastic", description="Host names are PREFIX-1, PREFIX-2, ...")
    instance_type: str = Field("local", description="Key into ``prices`` for host-hours of these hosts.")
    env_backend: dict[str, Any] | None = Field(
        None, description="Env backend of the started workers (default: the fleet's env_backend)."
    )


class Ec2ProviderConfig(BaseModel):
    """EC2 instances launched from a launch template; their user data starts an env worker that joins."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["ec2"] = "ec2"
    launch_template: str = Field(..., description="Launch template name (or id when it starts with 'lt-').")
    launch_template_version: str = Field("$Default", description="Template version: a number, $Default or $Latest.")
    region: str = Field("us-east-1", description="AWS region.")
    endpoint_url: str | None = Field(None, description="EC2 endpoint (moto or a VPC endpoint); None: AWS.")
    instance_type: str | None = Field(None, description="Overrides the template's instance type when set.")
    subnet_id: str | None = Field(None, description="Overrides the template's subnet when set.")
    tags: dict[str, str] = Field(default_factory=dict, description="Extra tags on each instance.")
    fleet: str = Field("megaflow", description="Value of the megaflow:fleet tag (hosts this fleet owns).")
    user_data: str = Field(
        "#!/bin/sh\nset -e\ncat >> /etc/megaflow.env <<'EOF'\n{env}\nEOF\nexec megaflow worker env --host {host}\n",
        description="User-data script; {host} and {env} (MEGAFLOW_* lines) are filled in.",
    )


class ElasticConfig(BaseModel):
    """Autoscaler and automatic execution mode."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="Run the autoscaler in the control service.")
    min_hosts: int = Field(1, ge=0, description="Fewest env hosts the autoscaler keeps.")
    max_hosts: int = Field(4, ge=1, description="Most env hosts the autoscaler runs.")
    interval_s: float = Field(10.0, gt=0, description="Period of one autoscaler decision.")
    cooldown_s: float = Field(60.0, ge=0, description="Least time between two scale actions in the same direction.")
    target_wait_s: float = Field(30.0, gt=0, description="Backlog is drained within this time when possible.")
    lag_threshold_s: float = Field(20.0, ge=0, description="Oldest queued wait above which one more host is added.")
    episode_s: float = Field(60.0, gt=0, description="Expected episode length before any has finished.")
    boot_s: float = Field(60.0, ge=0, description="Expected time from launch until a new host takes work.")
    idle_s: float = Field(60.0, ge=0, description="A host empty for this long may be drained (scale in).")
    provider: LocalProviderConfig | Ec2ProviderConfig = Field(
        default_factory=LocalProviderConfig, discriminator="type", description="How hosts are started and stopped."
    )
    prices: dict[str, float] = Field(
        default_factory=lambda: {"local": 0.0}, description="Price per host-hour by instance type (for the report)."
    )
    sample_keep: int = Field(2000, ge=10, description="Utilisation samples kept per host.")
    auto_mode: bool = Field(True, description="Choose ephemeral or persistent per image from demand.")
    persistent_min_demand: int = Field(
        4, ge=1, description="Episodes of one image waiting or arrived in the window that make it persistent."
    )
    demand_window_s: float = Field(300.0, gt=0, description="Window of recent arrivals for the mode choice.")
    max_pool: int = Field(8, ge=0, description="Largest warm pool per image per host the mode choice asks for.")

    @model_validator(mode="after")
    def _bounds(self) -> ElasticConfig:
        if self.min_hosts > self.max_hosts:
            raise ValueError(f"min_hosts ({self.min_hosts}) must be <= max_hosts ({self.max_hosts})")
        return self

    @classmethod
    def from_settings(cls, settings: Any) -> ElasticConfig:
        """Validate ``settings.elastic``; raise ConfigError naming the field and the fix."""
        try:
            return cls.model_validate(settings.elastic or {})
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "min_hosts"  # the only cross-field check
            raise ConfigError(
                f"elastic.{field}: {err['msg']} (fix MEGAFLOW_ELASTIC or the elastic: block; "
                "fields in megaflow/elastic/config.py)"
            ) from None

    def price(self, instance_type: str) -> float:
        """Price per host-hour of an instance type (0 when not listed)."""
        return float(self.prices.get(instance_type, 0.0))
