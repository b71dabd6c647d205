"""The EC2 provider against moto's EC2 server on loopback, driven by the autoscaler on a real Redis."""

from __future__ import annotations

import base64
import os

import pytest

from megaflow.core.keys import Keys
from megaflow.elastic import usage
from megaflow.elastic.autoscaler import Autoscaler
from megaflow.elastic.config import ElasticConfig
from megaflow.elastic.providers import Ec2Provider
from megaflow.engine.resources import ResourceManager
from tests.stores_fixtures import S3_ENV, MotoServer


@pytest.fixture(scope="module")
def ec2_endpoint():
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    server = MotoServer()
    server.start()
    yield server.endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _template(endpoint: str, name: str) -> str:
    import boto3

    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=endpoint)
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    ec2.create_launch_template(
        LaunchTemplateName=name, LaunchTemplateData={"ImageId": image, "InstanceType": "t3.medium"}
    )
    ec2.close()
    return name


def _cfg(endpoint: str, template: str, **kw) -> ElasticConfig:
    return ElasticConfig.model_validate(
        {
            "min_hosts": 0,
            "max_hosts": 3,
            "cooldown_s": 0,
            "idle_s": 0,
            "boot_s": 0,
            "episode_s": 10,
            "target_wait_s": 10,
            "prices": {"t3.medium": 0.0416},
            "provider": {
                "type": "ec2",
                "launch_template": template,
                "endpoint_url": endpoint,
                "tags": {"team": "rl"},
                "fleet": "test-fleet",
            },
            **kw,
        }
    )


def test_launch_uses_template_tags_and_user_data(ec2_endpoint, settings):
    cfg = _cfg(ec2_endpoint, _template(ec2_endpoint, "mf-env-a"))
    prov = Ec2Provider(settings, cfg.provider)
    [h] = prov.launch(1)
    inst = prov.ec2.describe_instances(InstanceIds=[h.ref])["Reservations"][0]["Instances"][0]
    tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
    assert tags["megaflow:fleet"] == "test-fleet" and tags["megaflow:host"] == h.name and tags["team"] == "rl"
    assert inst["InstanceType"] == "t3.medium"  # from the template
    assert h.instance_type == "t3.medium"
    ud = prov.ec2.describe_instance_attribute(InstanceId=h.ref, Attribute="userData")["UserData"]["Value"]
    script = base64.b64decode(ud).decode()
    assert f"megaflow worker env --host {h.name}" in script
    assert f"MEGAFLOW_REDIS_URL={settings.redis_url}" in script and "MEGAFLOW_HOST_NAME" not in script
    assert [x.ref for x in prov.owned()] == [h.ref]
    prov.terminate(h)
    assert not prov.alive(h) and prov.owned() == []
    prov.close()


def test_autoscaler_terminates_only_drained_idle_hosts(ec2_endpoint, settings, redis_client):
    cfg = _cfg(ec2_endpoint, _template(ec2_endpoint, "mf-env-b"))
    keys = Keys(settings.key_prefix)
    res = ResourceManager(redis_client, settings, keys)
    scaler = Autoscaler(redis_client, settings, res, cfg=cfg)
    res.enqueue([{"episode_id": f"e{i}", "user": "u", "image": "img"} for i in range(12)])
    d = scaler.tick(now=1000.0)
    assert d.delta == 2 and d.target == 2  # 12 episodes over 8 slots per host
    recs = scaler.managed()
    assert len(recs) == 2
    for name in recs:  # the instances boot and their env workers join
        res.register_host(name, capacity=8, images=[], warm={}, disk_free_gb=10.0)
    admitted = res.admit(20)
    busy = {a.host for a in admitted}
    assert len(admitted) == 12 and busy == set(recs)
    scaler.tick(now=1001.0)  # both hosts hold live episodes: nothing drained or removed
    for a in admitted:
        if a.host == sorted(busy)[0]:
            res.release(a.episode_id)
    d = scaler.tick(now=1002.0)
    assert d.target == 1
    free, held = sorted(busy)[0], sorted(busy)[1]
    states = {n: r["state"] for n, r in scaler.managed().items()}
    assert states == {free: "removed", held: "active"}
    alive = {r["name"]: scaler.provider.alive(scaler._handle(r)) for r in scaler.managed().values()}
    assert alive == {free: False, held: True}
    kinds = [e["kind"] for e in usage.events(redis_client, scaler.keys)]
    assert kinds.count("launch") == 2 and kinds.count("drain") == 1 and kinds.count("remove") == 1
    scaler.close(stop_hosts=True)
