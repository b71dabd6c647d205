"""``megaflow swebench ...``: grade predictions.jsonl on the fleet, run an agent over a dataset, build images.

Mounted by the main CLI with ``app.add_typer(swebench_app, name="swebench")``. Runs follow the
harness: a ``--run-id`` names the run, instances already graded in it (their report.json is in
the artifact store) are skipped, empty patches are not run, and the summary is the harness's own
``make_run_report`` (``<model>.<run_id>.json`` in ``--output-dir``, with the per-instance logs
under ``logs/run_evaluation/<run_id>/``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

app = typer.Typer(
    help="SWE-bench: grade predictions like the official harness, run agents, build images.", no_args_is_help=True
)
console = Console()
SUMMARY_KEYS = (
    "total_instances",
    "submitted_instances",
    "completed_instances",
    "resolved_instances",
    "unresolved_instances",
    "empty_patch_instances",
    "error_instances",
)


def _ids(values: list[str] | None) -> list[str] | None:
    out = [i.strip() for v in values or [] for i in v.replace(",", " ").split() if i.strip()]
    return out or None


def _namespace(value: str) -> str | None:
    return None if value.lower() in ("", "none", "local") else value


def _fail(message: str) -> None:
    Console(stderr=True).print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


def _submit_and_wait(
    client, specs: list[dict[str, Any]], user: str, max_workers: int | None, timeout: float | None
) -> str:
    """Submit one batch (the per-user limit set to ``max_workers``) and show progress until it is done."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if max_workers:
        client.rt.resources.set_quota(user, max_workers)
    sub = client.submit(specs, user=user)
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task(f"batch {sub.batch_id}", total=len(specs))
        client.wait(
            sub.batch_id,
            timeout=timeout,
            poll_s=1.0,
            on_progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    return sub.batch_id


def _summarise(client, rows: list[dict], preds: dict[str, dict], run_id: str, output_dir: Path) -> dict:
    from megaflow.swebench import layout

    layout.mirror_run(client.rt.artifacts, run_id, preds, output_dir)
    summary = layout.run_summary(preds, rows, run_id, output_dir)
    for key in SUMMARY_KEYS:
        console.print(f"{key.replace('_', ' ')}: {summary[key]}")
    model = layout.model_dir(next(iter(preds.values()))["model_name_or_path"]) if preds else "None"
    console.print(f"report: {output_dir / f'{model}.{run_id}.json'}")
    return summary


def _completed(client, run_id: str, preds: dict[str, dict]) -> set[str]:
    from megaflow.swebench import layout

    return {
        i
        for i, p in preds.items()
        if layout.read_report(client.rt.artifacts, run_id, p.get("model_name_or_path"), i) is not None
    }


@app.command("eval")
def eval_command(
    dataset: Annotated[Path, typer.Option("--dataset", "-d", help="Instances: .jsonl, .json, .parquet or a hub name.")],
    predictions: Annotated[str, typer.Option("--predictions", "-p", help="predictions.jsonl/.json, or 'gold'.")],
    run_id: Annotated[str, typer.Option("--run-id", help="Names the run; a rerun skips what it already graded.")],
    split: Annotated[str, typer.Option("--split", help="Split of a hub dataset.")] = "test",
    instance_ids: Annotated[
        list[str] | None, typer.Option("--instance-ids", "-i", help="Only these (repeat or comma).")
    ] = None,
    max_workers: Annotated[
        int | None, typer.Option("--max-workers", help="Episodes at once (the user's limit).")
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds the eval script may run (harness default).")
    ] = 1800,
    namespace: Annotated[
        str, typer.Option("--namespace", help="Image namespace; 'none' for local names.")
    ] = "swebench",
    output_dir: Annotated[Path, typer.Option("--output-dir", help="Where the summary and logs go.")] = Path("."),
    user: Annotated[str, typer.Option("--user", help="Submitting user (quota).")] = "swebench",
    wait_s: Annotated[float | None, typer.Option("--wait-s", help="Give up waiting after this many seconds.")] = None,
) -> None:
    """Grade a predictions file on the fleet, instance for instance as run_evaluation does."""
    from megaflow.client import Client
    from megaflow.core.errors import MegaflowError
    from megaflow.datasets import instance_to_spec, load_instances
    from megaflow.swebench.layout import read_predictions

    try:
        ids = _ids(instance_ids)
        all_rows = load_instances(dataset, split=split, namespace=_namespace(namespace))
        rows = [r for r in all_rows if not ids or r["instance_id"] in ids]
        missing = sorted(set(ids or ()) - {r["instance_id"] for r in rows})
        if missing:
            _fail(f"instance ids not in {dataset}: {' '.join(missing)}")
        if predictions == "gold":
            preds = [
                {"instance_id": r["instance_id"], "model_name_or_path": "gold", "model_patch": r["patch"]} for r in rows
            ]
        else:
            preds = read_predictions(predictions)
        by_id = {p["instance_id"]: p for p in preds}
        unknown = sorted(set(by_id) - {r["instance_id"] for r in all_rows})
        if unknown:
            _fail(f"prediction ids not in {dataset}: {' '.join(unknown)}")
        if ids:
            by_id = {i: p for i, p in by_id.items() if i in ids}
        with Client() as client:
            done = _completed(client, run_id, by_id)
            todo = [
                r
                for r in rows
                if r["instance_id"] in by_id
                and r["instance_id"] not in done
                and by_id[r["instance_id"]].get("model_patch") not in ("", None)
            ]
            console.print(f"{len(by_id)} predictions, {len(done)} already graded in run {run_id}, {len(todo)} to grade")
            if todo:
                specs = [
                    instance_to_spec(
                        r,
                        prediction=by_id[r["instance_id"]],
                        run_id=run_id,
                        timeout_s=timeout,
                        namespace=_namespace(namespace),
                    )
                    for r in todo
                ]
                _submit_and_wait(client, specs, user, max_workers, wait_s)
            _summarise(client, rows, by_id, run_id, output_dir)
    except MegaflowError as exc:
        _fail(str(exc))


@app.command("run")
def run_command(
    dataset: Annotated[Path, typer.Option("--dataset", "-d", help="Instances: .jsonl, .json, .parquet or a hub name.")],
    run_id: Annotated[str, typer.Option("--run-id", help="Names the run; a rerun skips instances already graded.")],
    model_name: Annotated[str, typer.Option("--model-name", help="model_name_or_path written to predictions.jsonl.")],
    split: Annotated[str, typer.Option("--split", help="Split of a hub dataset.")] = "test",
    agent_config: Annotated[
        Path | None, typer.Option("--agent-config", help="mini-swe-agent YAML or AgentSpec JSON.")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help="ModelSpec as JSON (backend, model, ...).")] = None,
    instance_ids: Annotated[
        list[str] | None, typer.Option("--instance-ids", "-i", help="Only these (repeat or comma).")
    ] = None,
    max_workers: Annotated[
        int | None, typer.Option("--max-workers", help="Episodes at once (the user's limit).")
    ] = None,
    grading: Annotated[
        str, typer.Option("--grading", help="fresh (default) or in_place (RL speed, trusts the agent).")
    ] = "fresh",
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds the eval script may run.")] = 1800,
    namespace: Annotated[
        str, typer.Option("--namespace", help="Image namespace; 'none' for local names.")
    ] = "swebench",
    output_dir: Annotated[Path, typer.Option("--output-dir", help="predictions.jsonl, summary and logs.")] = Path("."),
    user: Annotated[str, typer.Option("--user", help="Submitting user (quota).")] = "swebench",
    wait_s: Annotated[float | None, typer.Option("--wait-s", help="Give up waiting after this many seconds.")] = None,
) -> None:
    """Run an agent on every instance, grade each like the harness, write predictions.jsonl and the summary."""
    from megaflow.client import Client
    from megaflow.core.errors import MegaflowError
    from megaflow.datasets import instance_to_spec, load_instances
    from megaflow.swebench import layout

    try:
        rows = load_instances(dataset, _ids(instance_ids), split=split, namespace=_namespace(namespace))
        agent = None
        if agent_config is not None:
            agent = json.loads(agent_config.read_text()) if agent_config.suffix == ".json" else str(agent_config)
        model_spec = json.loads(model) if model else None
        with Client() as client:
            placeholder = {r["instance_id"]: {"model_name_or_path": model_name} for r in rows}
            done = _completed(client, run_id, placeholder)
            todo = [r for r in rows if r["instance_id"] not in done]
            console.print(f"{len(rows)} instances, {len(done)} already graded in run {run_id}, {len(todo)} to run")
            if todo:
                specs = [
                    instance_to_spec(
                        r,
                        agent_config=agent,
                        model=model_spec,
                        run_id=run_id,
                        grading=grading,
                        timeout_s=timeout,
                        model_name=model_name,
                        namespace=_namespace(namespace),
                    )
                    for r in todo
                ]
                _submit_and_wait(client, specs, user, max_workers, wait_s)
            preds = {}
            for r in rows:
                key = layout.instance_key(run_id, model_name, r["instance_id"], layout.PATCH)
                patch = client.rt.artifacts.get_bytes(key).decode() if client.rt.artifacts.exists(key) else ""
                preds[r["instance_id"]] = {
                    "instance_id": r["instance_id"],
                    "model_name_or_path": model_name,
                    "model_patch": patch,
                }
            path = layout.write_predictions(output_dir / run_id / "predictions.jsonl", list(preds.values()))
            console.print(f"predictions: {path}")
            _summarise(client, rows, preds, run_id, output_dir)
    except MegaflowError as exc:
        _fail(str(exc))


@app.command("build-image")
def build_image(
    instance_id: Annotated[str, typer.Option("--instance-id", help="Names the image sweb.eval.x86_64.<id>:latest.")],
    repo: Annotated[Path | None, typer.Option("--repo", help="A local git repository, committed at /testbed.")] = None,
    context: Annotated[
        Path | None, typer.Option("--context", help="A task directory with a Dockerfile instead.")
    ] = None,
    base_image: Annotated[
        str | None, typer.Option("--base-image", help="Base for --repo; default the sandbox image.")
    ] = None,
    namespace: Annotated[
        str, typer.Option("--namespace", help="Image namespace; 'none' (default) for local names.")
    ] = "none",
) -> None:
    """Build an instance image here under the harness's name (no registry needed)."""
    import docker

    from megaflow.core.errors import MegaflowError
    from megaflow.core.settings import Settings
    from megaflow.swebench.images import build_from_dockerfile, build_from_git_repo

    if (repo is None) == (context is None):
        _fail("give exactly one of --repo or --context")
    client = docker.from_env(timeout=600)
    try:
        if repo is not None:
            tag = build_from_git_repo(
                client,
                instance_id,
                repo,
                base_image=base_image or Settings.load().default_image,
                namespace=_namespace(namespace),
            )
        else:
            assert context is not None  # exactly one of --repo / --context, checked above
            tag = build_from_dockerfile(client, instance_id, context, namespace=_namespace(namespace))
    except MegaflowError as exc:
        _fail(str(exc))
    finally:
        client.close()
    console.print(f"built {tag}")
