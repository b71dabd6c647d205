"""Config of the ``sim`` env backend: latencies, exit codes and outputs per command pattern.

A value is fixed (``0.2``) or drawn from a distribution (``{"dist": "lognormal", "median": 0.2,
"sigma": 0.5}``); draws come from a random generator seeded per sandbox from ``seed`` and the
episode id, so a run is reproducible whatever the interleaving of episodes.
"""

from __future__ import annotations

import math
import random
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Fixed(_Strict):
    """Always ``value`` seconds."""

    dist: Literal["fixed"] = Field(description="Selects a fixed value.")
    value: float = Field(ge=0, description="The value, in seconds.")

    def draw(self, rng: random.Random) -> float:
        return self.value


class Uniform(_Strict):
    """Uniform between ``low`` and ``high`` seconds."""

    dist: Literal["uniform"] = Field(description="Selects the uniform distribution.")
    low: float = Field(ge=0, description="Smallest value, in seconds.")
    high: float = Field(ge=0, description="Largest value, in seconds (at least low).")

    @model_validator(mode="after")
    def _order(self) -> Uniform:
        if self.high < self.low:
            raise ValueError("high must be at least low")
        return self

    def draw(self, rng: random.Random) -> float:
        return rng.uniform(self.low, self.high)


class Lognormal(_Strict):
    """Log-normal with the given median and shape (sigma of the underlying normal); long right tail."""

    dist: Literal["lognormal"] = Field(description="Selects the log-normal distribution.")
    median: float = Field(gt=0, description="Median, in seconds.")
    sigma: float = Field(0.5, ge=0, le=5, description="Shape: sigma of log(value).")
    max: float | None = Field(None, gt=0, description="Optional cap, in seconds.")

    def draw(self, rng: random.Random) -> float:
        x = rng.lognormvariate(math.log(self.median), self.sigma)
        return min(x, self.max) if self.max is not None else x


class Exponential(_Strict):
    """Exponential with the given mean (memoryless waits)."""

    dist: Literal["exponential"] = Field(description="Selects the exponential distribution.")
    mean: float = Field(gt=0, description="Mean, in seconds.")
    max: float | None = Field(None, gt=0, description="Optional cap, in seconds.")

    def draw(self, rng: random.Random) -> float:
        x = rng.expovariate(1.0 / self.mean)
        return min(x, self.max) if self.max is not None else x


Dist = Annotated[float, Field(ge=0)] | Annotated[Fixed | Uniform | Lognormal | Exponential, Field(discriminator="dist")]


class Choice(_Strict):
    """One of ``values`` at random (weighted when ``weights`` is given)."""

    dist: Literal["choice"] = Field(description="Selects a random choice.")
    values: list[Any] = Field(min_length=1, description="The values to choose from.")
    weights: list[float] | None = Field(None, description="Relative weights, one per value.")

    @model_validator(mode="after")
    def _same_length(self) -> Choice:
        if self.weights is not None and len(self.weights) != len(self.values):
            raise ValueError("weights must have one entry per value")
        return self

    def draw(self, rng: random.Random) -> Any:
        return rng.choices(self.values, weights=self.weights)[0]


def draw(value: Any, rng: random.Random) -> Any:
    """A fixed value as is, a distribution or choice drawn from ``rng``."""
    return value.draw(rng) if hasattr(value, "draw") else value


def _check_regex(v: str | None, field: str) -> str | None:
    if v is not None:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"{field}: not a valid regular expression ({exc})") from None
    return v


class Each(_Strict):
    """For every match of ``match`` in the command, one piece of output (e.g. one line per test id)."""

    match: str = Field(description="Regular expression searched (all matches, in order) in the command.")
    output: str = Field(description="Text per match; {name} is replaced by the match's named group `name`.")

    @field_validator("match")
    @classmethod
    def _regex(cls, v: str) -> str:
        _check_regex(v, "match")
        return v


class SimRule(_Strict):
    """What a command produces; rules are tried in order and the first that applies wins."""

    match: str = Field(".*", description="Regular expression searched in the command.")
    if_ran: str | None = Field(
        None, description="Only when an earlier command of this sandbox matches this regular expression."
    )
    unless_ran: str | None = Field(
        None, description="Only when no earlier command of this sandbox matches this regular expression."
    )
    latency_s: Dist = Field(0.0, description="How long the command takes: seconds, or a distribution.")
    exit_code: Annotated[int, Field(ge=0, le=255)] | Choice = Field(
        0, description="Exit status, or {dist: choice, values: [...], weights: [...]}."
    )
    output: str | Choice = Field(
        "", description="Output (stdout and stderr joined); {name} is replaced by a named group of `match`."
    )
    each: list[Each] = Field(
        default_factory=list, description="Output pieces per match in the command, written before `output`."
    )

    @field_validator("match", "if_ran", "unless_ran")
    @classmethod
    def _regex(cls, v: str | None, info) -> str | None:
        return _check_regex(v, info.field_name)


class SimEnvConfig(_Strict):
    """No containers: a sandbox is a few dicts in memory; commands take time and produce what the rules say."""

    type: Literal["sim"] = Field("sim", description="Selects the simulated backend.")
    seed: int = Field(0, description="Seed of the random draws (combined with each episode id).")
    preset: Literal["demo"] | None = Field(
        None, description="Built-in rules appended after `rules`: 'demo' makes the demo batch come out as with Docker."
    )
    time_scale: float = Field(1.0, ge=0, description="Every latency is multiplied by this (0: no waiting at all).")
    boot_latency_s: Dist = Field(
        0.0, description="Time to create a sandbox (ephemeral, or persistent with no warm one)."
    )
    warm_latency_s: Dist = Field(0.0, description="Time to hand out a warm sandbox (persistent mode).")
    pull_latency_s: Dist = Field(0.0, description="Time to make a missing image present.")
    warm_pool: bool = Field(
        False,
        description="Model the warm pool: a persistent create gets a warm sandbox only when one is ready "
        "(pools refill in the background at boot latency, sized by settings.warm_pool_size or the fleet's "
        "published sizes); False: every persistent create gets a warm one.",
    )
    boot_failure_p: float = Field(
        0.0, ge=0, le=1, description="Probability that a create fails with a retryable infrastructure error."
    )
    images: list[str] | None = Field(
        None, description="Images present at start (None: every image counts as present, pulls cost nothing)."
    )
    capacity: int | None = Field(None, ge=1, description="Capacity reported (None: settings.host_capacity).")
    disk_free_gb: float = Field(100.0, ge=0, description="Free disk reported in the heartbeat.")
    builtins: bool = Field(
        True,
        description="Emulate simple cd / export / pwd / echo / cat / true / mkdir commands (and a final "
        "`> FILE` redirect) against the sandbox's simulated state before the rules apply.",
    )
    rules: list[SimRule] = Field(default_factory=list, description="Rules per command pattern, tried in order.")
    default: SimRule = Field(
        default_factory=lambda: SimRule.model_validate({}),
        description="What a command that no rule matches produces (default: exit 0, no output).",
    )

    def all_rules(self) -> list[SimRule]:
        """``rules`` then the preset's rules."""
        return list(self.rules) + ([SimRule.model_validate(r) for r in DEMO_RULES] if self.preset == "demo" else [])


# The demo batch (megaflow.demo_tasks): "fix" episodes run `git apply <<'MEGAFLOW_PATCH'` as an
# agent command, "noop" ones never do. Under sim the demo grades by the exit status of
# `python3 -m unittest` (megaflow.demo_tasks.demo_specs(grading="exit_code")); the per-test lines
# below are what a unittest run would print when test ids are named on its command line.
_TEST_ID = r"(?<![\w.])(?P<id>[A-Za-z_][\w.]*\.(?P<name>test_\w+))(?![\w.])"
DEMO_RULES: list[dict[str, Any]] = [
    {
        "match": r"python3? -m unittest",
        "if_ran": r"git apply <<",
        "latency_s": 0.3,
        "exit_code": 0,
        "each": [{"match": _TEST_ID, "output": "{name} ({id}) ... ok\n"}],
        "output": "\n----------------------------------------------------------------------\n\nOK\n",
    },
    {
        "match": r"python3? -m unittest",
        "latency_s": 0.3,
        "exit_code": 1,
        "each": [
            {"match": _TEST_ID.replace(r"test_\w+", "test_still_works"), "output": "{name} ({id}) ... ok\n"},
            {
                "match": _TEST_ID.replace(r"test_\w+", r"test_(?!still_works(?![\w.]))\w+"),
                "output": "{name} ({id}) ... FAIL\n",
            },
        ],
        "output": "\n----------------------------------------------------------------------\n\nFAILED (failures=1)\n",
    },
]
