"""Bad input, fuzzed (issue 17): settings, task specs through Client.submit, task files, batch ids.

Every generated bad case must end in one MegaflowError subclass whose one-line message names the
field (MEGAFLOW_X for settings), and a rejected batch must leave Redis untouched. Examples are few and
derandomized (the machine is small); run with ``-s`` to see the tallies.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections import Counter

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from megaflow import Client
from megaflow.core import guards
from megaflow.core.errors import MegaflowError, SettingsError, SpecError
from megaflow.core.settings import Settings
from megaflow.datasets import read_records, to_specs
from megaflow.demo_tasks import demo_specs

FUZZ = hsettings(
    max_examples=int(os.environ.get("MEGAFLOW_TEST_FUZZ_EXAMPLES", "40")),
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TALLY: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def _tally():
    yield
    for kind in sorted({k.split(":")[0] for k in TALLY}):
        print(f"\nbad input {kind}: {TALLY[kind + ':cases']} fuzzed, {TALLY[kind + ':rejected']} clear rejections"
              f", {TALLY[kind + ':accepted-any']} arbitrary values accepted (no error needed)")  # fmt: skip


def rejected(kind: str, exc: BaseException, *names: str) -> None:
    """Count a case; assert it was one clear MegaflowError naming one of ``names``."""
    TALLY[kind + ":cases"] += 1
    assert isinstance(exc, MegaflowError), f"{type(exc).__name__}: {exc}"
    text = str(exc)
    assert "\n" not in text and "Traceback" not in text and "pydantic" not in text.lower(), text
    assert any(n in text for n in names), f"{names} not named in: {text}"
    TALLY[kind + ":rejected"] += 1


# --- settings -----------------------------------------------------------------------------------
@contextlib.contextmanager
def environ(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _fields(kind: type) -> list[str]:
    return sorted(n for n, f in Settings.model_fields.items() if f.annotation in (kind, kind | None))


JUNK = st.sampled_from(["abc", "inf", "-inf", "nan", "NaN", "1e400", "-1e400", " x", "0x1g", "1,5", "++1", "true?"])
HUGE_INT = st.integers(min_value=10**12 + 1, max_value=10**30).map(str)
NEGATIVE = st.integers(min_value=-(10**15), max_value=-1).map(str)
HUGE_FLOAT = st.floats(min_value=3e6, max_value=1e300).map(repr)
UNSAFE = st.sampled_from(["../../x y", "a b", "a/b", "x*", "$(id)", "a\tb", "a\u202eb", "é", "-x", "a;b", "a" * 300])

BAD_SETTINGS = st.one_of(
    st.tuples(st.sampled_from(_fields(int)), st.one_of(JUNK, HUGE_INT, NEGATIVE, st.just("1.5"))),
    st.tuples(st.sampled_from(_fields(float)), st.one_of(JUNK, HUGE_FLOAT, NEGATIVE, st.just("0"))),
    st.tuples(st.sampled_from(_fields(bool)), st.sampled_from(["maybe", "2", "yess", "nope", "-1"])),
    st.tuples(st.sampled_from(["host_name", "key_prefix"]), UNSAFE),
    st.tuples(
        st.just("default_image"),
        st.one_of(UNSAFE.filter(lambda v: v != "a/b"), st.sampled_from(["UPPER", "a:b:c", "x@sha256:12", "a" * 500])),
    ),
    st.tuples(st.just("container_memory"), st.sampled_from(["lots", "1q", "-1g", "1", "5m", "9999999g", "1.g", "g"])),
    st.tuples(
        st.just("redis_url"),
        st.sampled_from(["http://x", "localhost:6379", "redis//x", "a b", "redis://h:99999/0", "redis://h:6379/x"]),
    ),
    st.tuples(st.sampled_from(["metadata_url", "artifacts_url"]), st.sampled_from(["garbage", "/tmp/x", "ftp://x"])),
    st.tuples(st.sampled_from(["state_dir"]), st.sampled_from(["rel/dir", ".", "a b"])),
    st.tuples(st.sampled_from(["s3_endpoint_url"]), st.sampled_from(["minio:9000", "ftp://m"])),
    st.tuples(st.just("env_mode"), st.sampled_from(["sometimes", "EPHEMERAL?", "pool"])),
    st.tuples(st.just("model_endpoints"), st.sampled_from(["[x", "ftp://a", '["http://a", 3]', "[1]", "gpu1:8000"])),
    st.tuples(st.sampled_from(["flower_address", "metrics_address"]), st.sampled_from(["a b", "x/y", "$(id)"])),
    st.tuples(st.sampled_from(["model_api_key", "flower_password", "registry_password"]), st.just("a\x1bb")),
)  # fmt: skip


@FUZZ
@given(BAD_SETTINGS)
def test_bad_setting_names_the_variable(case):
    name, value = case
    var = f"MEGAFLOW_{name.upper()}"
    with environ(**{var: value}), pytest.raises(MegaflowError) as exc:
        Settings.load()
    rejected("settings", exc.value, var)
    assert isinstance(exc.value, SettingsError) and exc.value.setting == var
    if "password" not in name and "api_key" not in name:
        assert guards.show(value)[:20] in str(exc.value)
    else:
        assert value not in str(exc.value)  # a secret is never echoed


@FUZZ
@given(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ_0123456789", min_size=1, max_size=30))
def test_unknown_setting_is_refused(suffix):
    var = f"MEGAFLOW_{suffix}"
    if var.lower().removeprefix("megaflow_") in Settings.model_fields or var in ("MEGAFLOW_CONFIG", "MEGAFLOW_DEBUG"):
        return
    if var.startswith(("MEGAFLOW_TEST_", "MEGAFLOW_COLLECT")):
        return
    with environ(**{var: "1"}), pytest.raises(MegaflowError) as exc:
        Settings.load()
    rejected("settings", exc.value, var)


def test_a_url_password_is_never_echoed():
    secret = "S3cr3t-" + "p" * 80
    with environ(MEGAFLOW_REDIS_URL=f"redis://:{secret}@h:abc/0"), pytest.raises(SettingsError) as exc:
        Settings.load()
    assert "MEGAFLOW_REDIS_URL" in str(exc.value) and "S3cr3t" not in str(exc.value)


def test_unknown_setting_names_the_closest():
    with environ(MEGAFLOW_GLOBAL_LIMT="3"), pytest.raises(SettingsError, match="did you mean MEGAFLOW_GLOBAL_LIMIT"):
        Settings.load()


@pytest.mark.parametrize("case", ["missing", "dir", "zero", "binary", "yaml", "list", "unknown", "deep", "value",
                                  "utf16", "big"])  # fmt: skip
def test_bad_config_file(case, tmp_path):
    path = tmp_path / "s.yaml"
    content = {"binary": b"\x00\xff\xfe", "yaml": b"a: [1,\n", "list": b"- 1\n", "unknown": b"global_limt: 3\n",
               "deep": b"host_name: " + b"[" * 50 + b"]" * 50 + b"\n", "value": b"lease_s: .inf\n",
               "utf16": "lease_s: 3\n".encode("utf-16"), "big": b"#" * (2 << 20)}  # fmt: skip
    where = {"missing": str(tmp_path / "nope.yaml"), "dir": str(tmp_path), "zero": "/dev/zero"}.get(case, str(path))
    if case in content:
        path.write_bytes(content[case])
    with environ(MEGAFLOW_CONFIG=where), pytest.raises(MegaflowError) as exc:
        Settings.load()
    rejected("settings", exc.value, "MEGAFLOW_CONFIG", "lease_s")


def test_bad_override_and_empty_env(tmp_path):
    with pytest.raises(SettingsError, match="host_name"):
        Settings.load(host_name="a\x00b")
    with pytest.raises(SettingsError, match="'colour' is not a MegaFlow setting"):
        Settings.load(colour="red")
    with environ(MEGAFLOW_GLOBAL_LIMIT=""):  # empty means unset: the default
        assert Settings.load(state_dir=str(tmp_path)).global_limit == 64


# --- task specs through Client.submit -----------------------------------------------------------
def good() -> dict:
    return demo_specs("fix")[0]


def deep(n: int) -> dict:
    d: dict = {}
    cur = d
    for _ in range(n):
        cur["a"] = {}
        cur = cur["a"]
    return d


def at(path: str, value):
    """A mutation setting ``path`` (dotted) of a good spec to ``value``."""

    def mutate(spec: dict) -> dict:
        *parents, last = path.split(".")
        node = spec
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
        return spec

    return path, mutate


BAD_IDS = [
    "",
    "$(rm -rf /)",
    "a\nb",
    "a\x00b",
    "x\u202egnp.exe",
    "../../etc",
    "a b",
    "x" * 201,
    "`id`",
    "a;b",
    "-x",
    "a/b",
    "\ud800",
    "ä",
]
BAD_PATHS = [
    "relative",
    "/repo/../etc/passwd",
    "/proc/self/mem",
    "/sys/kernel/x",
    "/dev/sda",
    "/a\x00b",
    "/a\nb",
    "/" + "a" * 5000,
    "/x/\u202eb",
    "/" + "n" * 300,
]
BAD_IMAGES = ["", "../x", "a" * 10000, "UPPER:latest", "a b", "a:b:c", "x@sha256:12", "\x00", "/abs", "a//b", "a:"]
BAD_ENV = [
    {"LD_PRELOAD": "/x.so"},
    {"ld_preload": "/x.so"},
    {"LD_LIBRARY_PATH": "/x"},
    {"BASH_ENV": "/x"},
    {"PYTHONSTARTUP": "/x"},
    {"NODE_OPTIONS": "-r x"},
    {"1BAD": "x"},
    {"A=B": "x"},
    {"": "x"},
    {"A": "x\x00y"},
    {"MEGAFLOW_REDIS_URL": "redis://evil"},
    {"DYLD_INSERT_LIBRARIES": "x"},
]
NAN = float("nan")
INF = float("inf")
MUTATIONS = st.one_of(
    st.sampled_from(BAD_IDS).map(lambda v: at("task_id", v)),
    st.sampled_from(BAD_IMAGES).map(lambda v: at("image", v)),
    st.sampled_from(BAD_PATHS).map(lambda v: at("workdir", v)),
    st.sampled_from(BAD_PATHS + ["/", "/repo/"]).map(lambda p: at("files", {p: "x"})),
    st.sampled_from(BAD_PATHS + ["/"]).map(lambda p: at("eval.files", {p: "x"})),
    st.sampled_from(BAD_ENV).map(lambda v: at("agent.env", v)),
    st.sampled_from([0, -1, 10**9, 2**70, 1.5, "many"]).map(lambda v: at("agent.max_steps", v)),
    st.sampled_from([NAN, INF, -1, 0, 1e30, "soon"]).map(lambda v: at("agent.wall_time_s", v)),
    st.sampled_from([NAN, INF, -INF, 0, 1e9]).map(lambda v: at("agent.command_timeout_s", v)),
    st.sampled_from([NAN, INF, 0, 1e9]).map(lambda v: at("eval.timeout_s", v)),
    st.sampled_from([NAN, INF, -1, 3, "hot", 1e308]).map(lambda v: at("model.temperature", v)),
    st.sampled_from([NAN, 2, -0.5]).map(lambda v: at("model.top_p", v)),
    st.sampled_from([0, -5, 10**12, NAN]).map(lambda v: at("model.max_tokens", v)),
    st.integers(min_value=33, max_value=2500).map(lambda n: at("metadata", {"m": deep(n)})),
    st.sampled_from([{"x": NAN}, {"$where": 1}, {"x": 2**80}, {"a\x00": 1}, {"x": "\ud800"}, {"x": {1, 2}},
                     {"x": [INF]}]).map(lambda v: at("metadata", v)),
    st.sampled_from(["a\x00b", "\ud800"]).map(lambda v: at("setup", [v])),
    st.sampled_from(["pytest\x00 -x"]).map(lambda v: at("eval.command", v)),
    st.sampled_from(["a\nb", "t\u202e", "x" * 5000]).map(lambda v: at("eval.fail_to_pass", [v])),
    st.sampled_from(["\ud800", "ok\udfff"]).map(lambda v: at("problem_statement", v)),
    st.sampled_from(["v\n1", "x" * 300]).map(lambda v: at("policy_version", v)),
    st.sampled_from([["a", 1], "replies", [None]]).map(lambda v: at("model.replies", v)),
)  # fmt: skip


def leaf(path: str) -> str:
    return path.split(".")[-1]


@FUZZ
@given(MUTATIONS, st.integers(min_value=0, max_value=2))
def test_bad_spec_is_rejected_and_enqueues_nothing(settings, redis_client, mutation, position):
    path, mutate = mutation
    batch = [good(), good()]
    batch.insert(position, mutate(good()))
    with Client(settings) as client, pytest.raises(MegaflowError) as exc:
        client.submit(batch, user="alice")
    rejected("api", exc.value, path, leaf(path))
    assert isinstance(exc.value, SpecError) and exc.value.index == position
    assert redis_client.keys("*") == []


BAD_BATCH_IDS = ["../../etc", "*", "", "\x00", "a b", "a:b", "x" * 129, "a\n", "-x", "é", 123, ["x"]]


@FUZZ
@given(
    st.one_of(st.sampled_from(BAD_BATCH_IDS), st.text(max_size=120).filter(lambda s: not guards.BATCH_ID.fullmatch(s)))
)
def test_bad_batch_id(settings, redis_client, batch_id):
    with Client(settings) as client, pytest.raises(MegaflowError) as exc:
        client.submit([good()], user="alice", batch_id=batch_id)
    rejected("api", exc.value, "batch_id")
    assert redis_client.keys("*") == []


@FUZZ
@given(st.sampled_from(["", "a b", "a\n", "$(id)", "x" * 65, "é", None, 7, "../u"]))
def test_bad_user(settings, redis_client, user):
    with Client(settings) as client, pytest.raises(MegaflowError) as exc:
        client.submit([good()], user=user)
    rejected("api", exc.value, "user")
    assert redis_client.keys("*") == []


@pytest.mark.parametrize("specs", ["a spec", b"x", None, 3, ["text"], [[1]], [None], []])
def test_bad_specs_argument(settings, redis_client, specs):
    with Client(settings) as client, pytest.raises(MegaflowError) as exc:
        client.submit(specs, user="alice")
    rejected("api", exc.value, "spec")
    assert redis_client.keys("*") == []


def test_caps_on_batch_and_spec_size(settings, redis_client):
    capped = settings.model_copy(update={"max_batch_episodes": 3, "max_spec_bytes": 16384})
    with Client(capped) as client:
        with pytest.raises(SpecError, match="MEGAFLOW_MAX_BATCH_EPISODES") as exc:
            client.submit((good() for _ in range(10**9)), user="alice")  # a generator is not read past the cap
        rejected("api", exc.value, "specs")
        big = dict(good(), problem_statement="x" * 20000)
        with pytest.raises(SpecError, match="MEGAFLOW_MAX_SPEC_BYTES") as exc:
            client.submit([good(), big], user="alice")
        rejected("api", exc.value, "problem_statement")
    assert redis_client.keys("*") == []


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)
PATHS = [
    "task_id",
    "image",
    "mode",
    "network",
    "workdir",
    "files",
    "setup",
    "problem_statement",
    "model",
    "model.backend",
    "model.replies",
    "model.temperature",
    "model.endpoints",
    "agent",
    "agent.type",
    "agent.max_steps",
    "agent.env",
    "agent.action_regex",
    "agent.system_template",
    "eval",
    "eval.command",
    "eval.files",
    "eval.fail_to_pass",
    "eval.log_parser",
    "policy_version",
    "metadata",
    "colour",
]


@FUZZ
@given(st.sampled_from(PATHS), JSON)
def test_any_value_anywhere_is_accepted_or_one_clear_error(settings, redis_client, path, value):
    """No value at any field ends in anything but acceptance or one MegaflowError (no traceback)."""
    _, mutate = at(path, value)
    with Client(settings) as client:
        try:
            client.submit([mutate(good())], user="alice")
        except MegaflowError as exc:
            rejected("api", exc, "field", "spec #0")
            assert redis_client.keys("*") == []
        else:
            TALLY["api:accepted-any"] += 1
            redis_client.flushall()


@FUZZ
@given(
    st.one_of(
        st.tuples(st.just("replicas"), st.sampled_from([0, -1, 10**9, True, 1.5, "3", None])),
        st.tuples(st.just("timeout"), st.sampled_from([NAN, INF, -1, 0, "1", 1e12])),
        st.tuples(st.just("max_infra_retries"), st.sampled_from([-1, 10**6, 2.5, "x"])),
    )
)
def test_bad_rollout_arguments(settings, redis_client, case):
    name, value = case
    with Client(settings) as client, pytest.raises(MegaflowError) as exc:
        client.rollout([good()], **{name: value})
    rejected("api", exc.value, name)
    assert redis_client.keys("*") == []


def test_rollout_product_is_capped(settings, redis_client):
    capped = settings.model_copy(update={"max_batch_episodes": 10})
    with Client(capped) as client, pytest.raises(SpecError, match="MEGAFLOW_MAX_BATCH_EPISODES") as exc:
        client.rollout([good(), good(), good()], replicas=4)
    rejected("api", exc.value, "replicas")
    assert redis_client.keys("*") == []


# --- batch ids never collide --------------------------------------------------------------------
def snapshot(r) -> dict:
    return {k: r.dump(k) for k in sorted(r.keys("*"))}


def test_existing_batch_id_is_rejected_and_nothing_changes(settings, redis_client):
    with Client(settings) as client:
        first = client.submit([good(), good()], user="alice", batch_id="exp-1")
        ep = client.rt.keys.episode(first.episode_ids[0])
        redis_client.hset(ep, mapping={"state": "SUCCEEDED", "reward": "1.0"})  # a finished episode
        before = snapshot(redis_client)
        for user in ("alice", "bob"):
            with pytest.raises(SpecError, match="batch 'exp-1' already exists") as exc:
                client.submit([dict(good(), task_id="other")], user=user, batch_id="exp-1")
            rejected("api", exc.value, "batch_id")
        assert snapshot(redis_client) == before
        assert redis_client.hget(ep, "state") == "SUCCEEDED"


def test_concurrent_submits_of_one_batch_id(settings, redis_client):
    results: list[object] = []

    def submit():
        with Client(settings) as client:
            try:
                results.append(client.submit([good()], user="alice", batch_id="race"))
            except SpecError as exc:
                results.append(exc)

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(not isinstance(r, SpecError) for r in results) == 1
    assert redis_client.llen(Client(settings).rt.keys.batch_episodes("race")) == 1


def test_episode_ids_unique_across_batches(settings, redis_client):
    with Client(settings) as client:
        subs = [client.submit([good(), good()], user="alice", batch_id=b) for b in ("x", "x-00001", "x-0")]
        subs += [client.submit([good()], user="alice") for _ in range(5)]
    ids = [e for s in subs for e in s.episode_ids]
    assert len(ids) == len(set(ids)) and len({s.batch_id for s in subs}) == len(subs)


def test_batch_id_known_to_the_metadata_store_is_rejected(settings, redis_client):
    with Client(settings) as client:
        client.rt.metadata.upsert_task({"episode_id": "old-00000", "batch_id": "old", "state": "SUCCEEDED"})
        with pytest.raises(SpecError, match="already exists"):
            client.submit([good()], user="alice", batch_id="old")
    assert redis_client.keys("*") == []


# --- task files ---------------------------------------------------------------------------------
def _line(spec: dict) -> bytes:
    return json.dumps(spec).encode()


FILES = st.one_of(
    st.binary(min_size=1, max_size=200).filter(lambda b: _undecodable(b)),
    st.builds(lambda s: json.dumps(s).encode("utf-16"), st.just(demo_specs("fix")[0])),
    st.builds(lambda s: json.dumps(s).encode("utf-16-le"), st.just(demo_specs("fix")[0])),
    st.integers(min_value=1000, max_value=200_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(min_value=1000, max_value=100_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.integers(min_value=5000, max_value=20_000).map(lambda n: b'{"task_id": ' + b"9" * n + b"}"),
    st.sampled_from([b"{", b"not json", b"\xef\xbb\xbf{bad", b'{"task_id": NaN}', b"[1, 2", b"\x00\x00",
                     b'{"task_id": "a"}\n{', b'"just a string"', b"[[1]]", b"42"]),
    st.integers(min_value=33, max_value=900).map(lambda n: _line(dict(good(), metadata=deep(n)))),
    st.sampled_from([dict(good(), task_id="$(id)"), dict(good(), image=""), dict(good(), workdir="/proc"),
                     {"instance_id": "x"}]).map(_line),
)  # fmt: skip


def _undecodable(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return b"\x00" in b
    except UnicodeDecodeError:
        return True


@FUZZ
@given(FILES)
def test_bad_task_file(settings, redis_client, tmp_path_factory, content):
    path = tmp_path_factory.mktemp("tf") / "tasks.jsonl"
    path.write_bytes(content)
    with Client(settings) as client, pytest.raises(MegaflowError) as exc:
        client.submit(to_specs([r for _, r in read_records(path)]), user="alice")
    rejected("files", exc.value, str(path), "field", "spec #")
    assert redis_client.keys("*") == []


@pytest.mark.parametrize("where", ["dir", "/dev/zero", "/dev/urandom", "missing", "big"])
def test_unreadable_task_file(tmp_path, where):
    path = {"dir": tmp_path, "missing": tmp_path / "nope.jsonl", "big": tmp_path / "big.jsonl"}.get(where, where)
    if where == "big":
        path.write_bytes(_line(good()) * 100)
    with pytest.raises(MegaflowError) as exc:
        read_records(path, max_bytes=4096)
    rejected("files", exc.value, str(path))


def test_good_task_file_still_reads(tmp_path):
    path = tmp_path / "ok.jsonl"
    specs = demo_specs("fix")[:3]
    path.write_text("\ufeff" + "\n".join(json.dumps(s, ensure_ascii=False) for s in specs) + "\n\n")
    assert [r for _, r in read_records(path)] == specs
