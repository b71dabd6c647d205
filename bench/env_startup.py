"""Container start-up on one env host, same image: plain `docker run` vs ephemeral vs persistent (warm pool).

    python bench/env_startup.py [--runs 10] [--image megaflow-sandbox:latest] [--disk-mode off|loop|auto] [--user root]

Figures (medians over --runs):
  anchor      `docker run --rm --network none IMAGE true` (the docker CLI, end to end)
  ephemeral   DockerHost.create(mode="ephemeral") -> handle ready, and -> first exec (`true`) returned
  persistent  DockerHost.create(mode="persistent") from a full warm pool -> handle ready, and -> first exec returned
  one command  a later `true` in the same container: plain docker exec vs its exec session
Goals: ephemeral (to first exec) <= 1.2x anchor; persistent at least 10x faster than ephemeral.
Containers are removed after each run (not timed); the pool refills between persistent runs (not timed).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import docker

    from megaflow.core.settings import Settings
    from megaflow.env_hosts import DockerHost
    from megaflow.env_hosts import labels as L
    from megaflow.env_hosts.images import ensure_sandbox_image

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--image", default=None)
    parser.add_argument("--disk-mode", default=None, help="container_disk_mode (default: the settings')")
    parser.add_argument("--user", default=None, help="container_user (default: the settings')")
    args = parser.parse_args()

    client = docker.from_env(timeout=300)
    overrides = {"container_disk_mode": args.disk_mode, "container_user": args.user}
    settings = Settings.load(env_mode="persistent", warm_pool_size=1, **{k: v for k, v in overrides.items() if v})
    image = ensure_sandbox_image(client, args.image or settings.default_image)
    name = f"bench-{uuid.uuid4().hex[:6]}"
    host = DockerHost(client, settings.model_copy(update={"default_image": image}), name=name)

    anchor, eph_ready, eph_exec, per_ready, per_exec = [], [], [], [], []
    plain_cmd, session_cmd = [], []
    try:
        subprocess.run(["docker", "run", "--rm", "--network", "none", image, "true"], check=True)  # warm caches
        for i in range(args.runs):
            t = time.perf_counter()
            subprocess.run(
                ["docker", "run", "--rm", "--network", "none", "--label", f"{L.HOST}={name}", image, "true"], check=True
            )
            anchor.append(time.perf_counter() - t)

            t = time.perf_counter()
            handle = host.create(f"bench-e{i}", image, labels={}, mode="ephemeral")
            eph_ready.append(time.perf_counter() - t)
            t1 = time.perf_counter()
            assert host.execute(handle, "true", timeout=30).exit_code == 0
            eph_exec.append(time.perf_counter() - t)
            plain_cmd.append(time.perf_counter() - t1)
            deadline = time.monotonic() + 30  # the background session, not timed
            while handle.id not in host.exec_sessions and time.monotonic() < deadline:
                time.sleep(0.01)
            t1 = time.perf_counter()
            assert host.execute(handle, "true", timeout=30).exit_code == 0
            session_cmd.append(time.perf_counter() - t1)
            host.close(handle)

            host.pool.refill(image)
            t = time.perf_counter()
            handle = host.create(f"bench-p{i}", image, labels={}, mode="persistent")
            per_ready.append(time.perf_counter() - t)
            assert host.execute(handle, "true", timeout=30).exit_code == 0
            per_exec.append(time.perf_counter() - t)
            assert handle.data["warm"], "the warm pool was empty"
            host.close(handle)
    finally:
        host.shutdown()
        for c in client.api.containers(all=True, filters={"label": f"{L.HOST}={name}"}):
            host.remove_container(c["Id"])
        host.disk.sweep(host.containers.list_all_ids)

    med = {
        k: statistics.median(v)
        for k, v in {
            "anchor": anchor,
            "eph_ready": eph_ready,
            "eph_exec": eph_exec,
            "per_ready": per_ready,
            "per_exec": per_exec,
            "plain_cmd": plain_cmd,
            "session_cmd": session_cmd,
        }.items()
    }
    ms = lambda s: f"{s * 1000:8.1f} ms"
    print(
        f"image {image}, {args.runs} runs, medians; disk limit {host.disk.describe()}, user {settings.container_user}"
    )
    print(f"  anchor  docker run --rm IMAGE true           {ms(med['anchor'])}")
    print(f"  ephemeral create -> handle ready             {ms(med['eph_ready'])}")
    print(f"  ephemeral create -> first exec returned      {ms(med['eph_exec'])}")
    print(f"  persistent acquire -> handle ready           {ms(med['per_ready'])}")
    print(f"  persistent acquire -> first exec returned    {ms(med['per_exec'])}")
    print(f"  one command `true`: plain docker exec        {ms(med['plain_cmd'])}")
    print(f"  one command `true`: exec session             {ms(med['session_cmd'])}")
    r1 = med["eph_exec"] / med["anchor"]
    r2 = med["eph_exec"] / med["per_exec"]
    r3 = med["eph_ready"] / med["per_ready"]
    print(
        f"  ephemeral / anchor (to first exec)            {r1:6.2f}x  goal <= 1.2x  {'OK' if r1 <= 1.2 else 'MISSED'}"
    )
    print(f"  ephemeral / persistent (to first exec)        {r2:6.1f}x  goal >= 10x   {'OK' if r2 >= 10 else 'MISSED'}")
    print(f"  ephemeral / persistent (to handle ready)      {r3:6.1f}x")


if __name__ == "__main__":
    main()
