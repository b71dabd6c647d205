"""Batch commands: ``submit``, ``status``, ``cancel``, ``rollout``, ``resume``, ``report``, ``trajectory``.

Each prints a table for people and ``--json`` / ``--jsonl`` for scripts; the exit status of a
command that waits tells how the episodes ended (see ``megaflow.cli.base``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from megaflow.cli.base import (
    EXIT_INFRA,
    EXIT_OK,
    JSON_HELP,
    JSONL_HELP,
    App,
    console,
    echo_json,
    echo_jsonl,
    load_settings,
    outcome_status,
    output_format,
)
from megaflow.cli.tables import print_results, render_status
from megaflow.core.errors import SpecError

app = App(help="Batches: submit, follow, cancel, re-run, report.")


def parse_json_option(value: str | None, option: str) -> dict[str, Any] | None:
    """A JSON object given on the command line; anything else is a usage error naming the option."""
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(
            f"not valid JSON ({exc.msg} at column {exc.colno}); quote keys and strings, "
            'e.g. \'{"backend": "openai", "model_name": "m"}\'',
            param_hint=option,
        ) from None
    if not isinstance(parsed, dict):
        raise typer.BadParameter(f"must be a JSON object, got {type(parsed).__name__}", param_hint=option)
    return parsed


def load_agent_config(path: Path | None) -> Any:
    """The mini-swe-agent config named by --agent-config, read now (a missing file is an error, not ignored)."""
    if path is None:
        return None
    from megaflow.agents.mini import load_mini_config

    return load_mini_config(path)


def check_instance_options(file: Path, records: list[Any], **given: Any) -> None:
    """--agent-config and --model apply to SWE-bench instance lines; with none in the file they would do nothing."""
    used = [name for name, value in given.items() if value is not None]
    if used and records and not any(isinstance(r, dict) and "instance_id" in r and "task_id" not in r for r in records):
        option = "--" + used[0].replace("_", "-")
        raise typer.BadParameter(
            f"applies to SWE-bench instance lines, and {file} holds task specs only; put the "
            f"section in each spec ('agent' / 'model') instead",
            param_hint=option,
        )


def _file_line(wheres: list[str], exc: SpecError) -> SpecError:
    """A spec error re-worded to name the file line (``wheres``: each record's ``file:line``) rather than the index."""
    if exc.index is None or exc.index >= len(wheres):
        return exc
    return SpecError(f"{wheres[exc.index]}: {str(exc).split(': ', 1)[1]}", field=exc.field)


def _print_results(rows: list[dict[str, Any]], fmt: str, extra: dict[str, Any] | None = None) -> None:
    if fmt == "json":
        echo_json({**(extra or {}), "results": rows})
    elif fmt == "jsonl":
        echo_jsonl(rows)
    else:
        print_results(console(), rows)


@app.command()
def submit(
    file: Annotated[
        Path, typer.Argument(metavar="FILE", help="JSONL file: task specs or SWE-bench instances, one a line.")
    ],
    user: Annotated[
        str, typer.Option("--user", "-u", metavar="NAME", help="User the batch runs as (quotas are per user).")
    ],
    wait: Annotated[
        bool,
        typer.Option(
            "--wait",
            help="Wait for the batch, show progress, print its results; "
            "the exit status then tells how the episodes ended.",
        ),
    ] = False,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            min=0,
            help="With --wait: give up after this many seconds (exit status 6; the batch keeps running).",
        ),
    ] = None,
    agent_config: Annotated[
        Path | None,
        typer.Option("--agent-config", metavar="YAML", help="mini-swe-agent YAML config for instance lines."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            metavar="JSON",
            help='JSON model section for instance lines, e.g. \'{"backend": "openai", "model_name": "m"}\'.',
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    as_jsonl: Annotated[bool, typer.Option("--jsonl", help=JSONL_HELP)] = False,
) -> None:
    """Submit a batch; nothing is enqueued if any line is invalid."""
    from megaflow.cli.progress import follow_batch
    from megaflow.client import Client
    from megaflow.datasets import read_records, to_specs

    fmt = output_format(as_json, as_jsonl)
    if timeout is not None and not wait:
        raise typer.BadParameter("only means something with --wait", param_hint="--timeout")
    model_section = parse_json_option(model, "--model")
    mini = load_agent_config(agent_config)
    settings = load_settings()
    pairs = read_records(file, max_bytes=settings.max_task_file_bytes)
    wheres, records = [w for w, _ in pairs], [r for _, r in pairs]
    check_instance_options(file, records, agent_config=agent_config, model=model)
    specs = to_specs(records, agent_config=mini, model=model_section)
    with Client(settings) as client:
        try:
            sub = client.submit(specs, user=user)
        except SpecError as exc:
            raise _file_line(wheres, exc) from None
        line = f"batch {sub.batch_id}: {len(sub.episode_ids)} episodes submitted for {user}"
        console(stderr=fmt != "table").print(line, markup=False)
        if not wait:
            if fmt == "json":
                echo_json({"batch_id": sub.batch_id, "episode_ids": sub.episode_ids})
            elif fmt == "jsonl":
                echo_jsonl({"batch_id": sub.batch_id, "episode_id": e} for e in sub.episode_ids)
            return
        status = follow_batch(client, sub.batch_id, timeout=timeout)
        rows = client.results(sub.batch_id)
    _print_results(rows, fmt, {"batch_id": sub.batch_id, "counts": status["counts"]})
    raise typer.Exit(outcome_status(rows))


def _person(settings: Any) -> str | None:
    """The per-person Redis user of MEGAFLOW_REDIS_URL, or None (the operator, a role, or Redis unreachable)."""
    import redis

    from megaflow.security.identity import authenticated_user, is_person

    client = redis.Redis.from_url(settings.redis_url, decode_responses=True, socket_connect_timeout=3, socket_timeout=5)
    try:
        who = authenticated_user(client)
    except redis.RedisError:  # the records do not need Redis; a person's URL always answers WHOAMI
        return None
    finally:
        client.close()
    return who if is_person(settings.key_prefix, who) else None


@app.command()
def status(
    batch: Annotated[str | None, typer.Argument(metavar="BATCH", help="Batch id; omit for every recent batch.")] = None,
    user: Annotated[str | None, typer.Option("--user", "-u", metavar="NAME", help="Only this user's batches.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    as_jsonl: Annotated[bool, typer.Option("--jsonl", help=JSONL_HELP + " (episodes, or batches)")] = False,
) -> None:
    """Records from the metadata store: counts by state, throughput and failure causes."""
    from megaflow.status import batch_status, overview

    fmt = output_format(as_json, as_jsonl)
    settings = load_settings()
    person = _person(settings)
    if person is not None:  # a per-person Redis user: the control service reads the records, of their batches only
        from megaflow.client import Client

        with Client(settings) as client:
            data = client.ask("batch_status", batch_id=batch) if batch is not None else client.ask("overview")
    else:
        data = batch_status(settings, batch) if batch is not None else overview(settings, user=user)
    if fmt == "json":
        echo_json(data)
    elif fmt == "jsonl":
        echo_jsonl(data["episodes"] if batch is not None else data["batches"])
    else:
        render_status(console(), data, hint=console(stderr=True))


@app.command()
def cancel(
    batch: Annotated[str, typer.Argument(metavar="BATCH", help="Batch id.")],
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Cancel every unfinished episode of a batch, in whatever state it is."""
    from megaflow.client import Client

    with Client(load_settings()) as client:
        n = client.cancel(batch)
    if as_json:
        echo_json({"batch_id": batch, "cancelling": n})
    else:
        console().print(f"batch {batch}: cancelling {n} unfinished episodes", markup=False)


@app.command()
def rollout(
    file: Annotated[
        Path, typer.Argument(metavar="FILE", help="JSONL file: SWE-bench instances or task specs, one a line.")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", metavar="JSONL", help="Output file: one line per finished group.")
    ],
    replicas: Annotated[
        int,
        typer.Option("--replicas", "--keep", "-k", metavar="K", min=1, help="Episodes kept per task (one group)."),
    ] = 1,
    oversample: Annotated[
        int | None,
        typer.Option(
            "--oversample",
            metavar="N",
            min=1,
            help="Run N >= K episodes per task; keep K (lowest indices finished by the deadline), cancel the rest.",
        ),
    ] = None,
    grace: Annotated[
        float,
        typer.Option(
            "--grace", metavar="F", min=0, help="With --oversample: deadline = T_k + F x (T_k - group start)."
        ),
    ] = 0.5,
    priority: Annotated[
        bool, typer.Option("--priority", help="Model calls of trajectories further along go first (Heddle).")
    ] = False,
    user: Annotated[str, typer.Option("--user", "-u", metavar="NAME", help="User the episodes run as.")] = "rollout",
    policy_version: Annotated[
        str | None, typer.Option("--policy-version", metavar="TAG", help="Policy version tag recorded with every call.")
    ] = None,
    agent_config: Annotated[
        Path | None,
        typer.Option("--agent-config", metavar="YAML", help="mini-swe-agent YAML config for instance lines."),
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", metavar="JSON", help="JSON model section for instance lines.")
    ] = None,
    max_retries: Annotated[
        int, typer.Option("--max-retries", metavar="N", min=0, help="Resubmissions of an infra-failed episode.")
    ] = 2,
    timeout: Annotated[
        float | None, typer.Option("--timeout", metavar="SECONDS", min=0, help="Give up after this many seconds.")
    ] = None,
) -> None:
    """Run every task K times; write each group (rewards, trajectories, tokens) as soon as it is done.

    Exit status 0 when every group was written unmasked, 4 when some group still holds an infra failure.
    """
    from megaflow.cli.progress import Progress
    from megaflow.client import Client
    from megaflow.datasets import read_records, to_specs

    model_section = parse_json_option(model, "--model")
    mini = load_agent_config(agent_config)
    settings = load_settings()
    records = [r for _, r in read_records(file, max_bytes=settings.max_task_file_bytes)]
    check_instance_options(file, records, agent_config=agent_config, model=model)
    tasks = to_specs(records, agent_config=mini, model=model_section, policy_version=policy_version)
    n = masked = 0
    with out.open("w") as fh, Client(settings) as client:  # the output path fails before any work
        run = client.rollout(
            tasks,
            replicas=replicas,
            oversample=oversample,
            grace=grace,
            priority=priority,
            policy_version=policy_version,
            user=user,
            max_infra_retries=max_retries,
            timeout=timeout,
        )
        out_console = console()
        with Progress(f"rollout {run.batch_id}", len(tasks)) as bar:
            bar.update(0, {})
            for group in run:
                fh.write(json.dumps(group) + "\n")
                fh.flush()
                n += 1
                masked += bool(group["masked"])
                line = f"group {group['index']} {group['task_id']}: rewards {group['rewards']}" + (
                    " masked" if group["masked"] else ""
                )
                if bar.live:  # above the bar, so the two do not garble each other on a terminal
                    bar.note(line)
                else:
                    out_console.print(line, markup=False)
                bar.update(n, {"written": n, "masked": masked})
    console().print(f"{n} groups written to {out} ({masked} masked)", markup=False)
    raise typer.Exit(EXIT_INFRA if masked else EXIT_OK)


@app.command()
def resume(
    batch: Annotated[str, typer.Argument(metavar="BATCH", help="Batch id.")],
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for the re-run and print the batch's final results.")
    ] = False,
    timeout: Annotated[
        float | None,
        typer.Option("--timeout", metavar="SECONDS", min=0, help="With --wait: give up after this many seconds."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    as_jsonl: Annotated[bool, typer.Option("--jsonl", help=JSONL_HELP)] = False,
) -> None:
    """Re-run a batch's infra failures; episodes that finished are skipped."""
    from megaflow.cli.progress import follow_batch
    from megaflow.client import Client

    fmt = output_format(as_json, as_jsonl)
    if timeout is not None and not wait:
        raise typer.BadParameter("only means something with --wait", param_hint="--timeout")
    with Client(load_settings()) as client:
        res = client.resume(batch)
        line = (
            f"batch {batch}: {len(res.resubmitted)} infra failures re-run"
            + (f" as batch {res.rerun_batch}" if res.rerun_batch else "")
            + f"; {res.skipped_finished} finished (skipped), {res.still_running} still running"
            + (f", {res.missing} expired" if res.missing else "")
        )
        console(stderr=fmt != "table").print(line, markup=False)
        if not wait:
            if fmt != "table":
                echo_json({"batch_id": batch, "rerun_batch": res.rerun_batch, "resubmitted": res.resubmitted})
            return
        if res.rerun_batch:
            follow_batch(client, res.rerun_batch, timeout=timeout)
        rows = client.final_results(batch)
    _print_results(rows, fmt, {"batch_id": batch, "rerun_batch": res.rerun_batch})
    raise typer.Exit(outcome_status(rows))


@app.command()
def report(
    batch: Annotated[str, typer.Argument(metavar="BATCH", help="Batch id.")],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="Output directory.")] = Path("report"),
) -> None:
    """Write an HTML report with plots for a batch, built from the metadata store."""
    from megaflow.report import build_report, fleet_over
    from megaflow.stores import open_metadata_store

    if out.exists() and not out.is_dir():
        raise typer.BadParameter(f"{out} is a file; give a directory (it is created if missing)", param_hint="--out")
    settings = load_settings()
    store = open_metadata_store(settings.metadata_url, settings)
    try:
        path = build_report(store, batch, out, host_capacity=settings.host_capacity, fleet=fleet_over(settings))
    finally:
        store.close()
    console().print(f"report written to {path}", markup=False)


@app.command()
def trajectory(
    episode: Annotated[str, typer.Argument(metavar="EPISODE", help="Episode id (as in `megaflow status BATCH`).")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", metavar="FILE", help="Write to FILE instead of stdout.")
    ] = None,
) -> None:
    """Print the saved trajectory (JSON) of a finished episode."""
    from megaflow.client import Client

    with Client(load_settings()) as client:
        data = client.trajectory(episode)  # NotFoundError for an unknown or unfinished episode
    text = json.dumps(data, indent=2, default=str) + "\n"
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text)
