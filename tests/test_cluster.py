"""The DAG on a real two-node Ray cluster on this machine, writing to a real S3 server.

`ray start --head` and `ray start --address ...` (each node with its own CPUs and a label
resource), runs submitted with `ray job submit --working-dir`, the output root in moto's S3
server on 127.0.0.1. The cluster run must equal a single-process local run (same uids, same
statuses, same scores, byte-identical curated shards), and a worker node killed mid-stage must
cost nothing: every sample exactly once.

All traffic stays on this machine: the embedded dataset and moto listen on 127.0.0.1; Ray's nodes
talk over the machine's own address.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import free_port
from run_compare import assert_runs_equal, curated_digests, load_run

from pipeline.ray_runtime import RAY_SYSTEM_CONFIG
from pipeline.sample_runner import BROKEN_NODE_HOOK

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET = "curation-test"
SAMPLES = 30
SHARD_SIZE = 5
POLICIES = "all,no-parrot,tmars"
CONFIG = """
[download]
timeout_s = 4.0
[ocr]
engine = "rapidocr"      # the fast engine: this test is about the cluster, not OCR quality
cpus_per_replica = 0.5
[clip]
cpus_per_replica = 0.5
[reshard]
samples_per_shard = 8
"""
STAGES = ("download", "ocr", "parrot", "clip_score")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def own_ports() -> list[str]:
    """Free ports for a node's dashboard agent, which otherwise binds fixed defaults (52365): with
    another Ray on the machine (a developer's, a test's) the head's agent could not start and every
    job submission failed with "No available agent"."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]


@dataclass
class Cluster:
    """A head node and worker nodes started with the `ray` CLI, each in its own process group."""

    tmp: Path
    env: dict[str, str]
    gcs: str
    dashboard: str
    workers: list[subprocess.Popen] = field(default_factory=list)

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def add_worker(self, name: str, cpus: int, env: dict[str, str] | None = None) -> subprocess.Popen:
        """`ray start --address ... --block` in a new session, so killing its group kills the node.

        Each node gets its own temp dir, as separate machines would: nodes sharing one would share
        the unpacked job working_dir too, and a node's death could pull it from under the others.
        """
        log = open(self.tmp / f"{name}.log", "w")
        proc = subprocess.Popen(
            [str(BIN / "ray"), "start", f"--address={self.gcs}", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}",
             f"--resources={json.dumps({name: 1})}", f"--temp-dir={self.tmp / name}", "--disable-usage-stats",
             *own_ports(), "--block"],
            env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.workers.append(proc)
        # a node's start (imports, raylet, agents) took over 90 s at load ~7: the bound is for a hang, not for speed
        self.wait_for(lambda nodes: any(name in n["resources"] and n["alive"] for n in nodes), f"node {name} up",
                      timeout=240)
        return proc

    def state(self, what: str) -> list[dict]:
        """Nodes, tasks or actors from Ray's state API (in a subprocess: this one has its own Ray)."""
        code = f"""
import json
from ray.util.state import list_nodes, list_tasks, list_actors
addr = {self.dashboard!r}
if {what!r} == "nodes":
    out = [dict(id=n.node_id, alive=n.state == "ALIVE", resources=n.resources_total) for n in list_nodes(address=addr)]
elif {what!r} == "tasks":
    out = [dict(name=t.name, node=t.node_id, state=str(t.state)) for t in list_tasks(address=addr, limit=10000, detail=True)]
else:
    out = [dict(name=a.class_name, node=a.node_id, state=str(a.state)) for a in list_actors(address=addr, limit=10000, detail=True)]
print(json.dumps(out))
"""
        done = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    def wait_for(self, predicate, what: str, timeout: float = 90) -> list[dict]:  # noqa: ANN001
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            nodes = self.state("nodes")
            if predicate(nodes):
                return nodes
            time.sleep(1)
        raise AssertionError(f"timed out waiting for {what}")

    def submit(self, output: str, port: int, config: Path, submission_id: str) -> None:
        """`ray job submit --no-wait --working-dir <repo> -- python -m pipeline curate ...`."""
        runtime_env = {"env_vars": {k: self.env[k] for k in self.env if k.startswith("AWS_") or k == "CURATION_CACHE"}}
        deadline = time.monotonic() + 120
        while True:
            done = self.ray(
                "job", "submit", f"--address={self.dashboard}", f"--submission-id={submission_id}", "--no-wait",
                f"--working-dir={REPO}", f"--runtime-env-json={json.dumps(runtime_env)}", "--entrypoint-num-cpus=0", "--",
                sys.executable, "-m", "pipeline", "curate", "--output", output, "--samples", str(SAMPLES), "--shard-size",
                str(SHARD_SIZE), "--port", str(port), "--config", str(config), "--policies", POLICIES, "--no-progress",
            )
            # right after `ray start` the head's job agent may not be registered yet: wait for it
            if done.returncode == 0 or "No available agent" not in done.stdout + done.stderr or time.monotonic() > deadline:
                break
            time.sleep(3)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    def wait_job(self, submission_id: str, timeout: float = 600) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = self.ray("job", "status", f"--address={self.dashboard}", submission_id)
            # "Status for job 'x': RUNNING" while it runs, "Job 'x' succeeded" once it ended
            match = re.search(r"job '[^']+'(?: has)?:? (succeeded|failed|stopped)\b", done.stdout + done.stderr, re.IGNORECASE)
            if match:
                logs = self.ray("job", "logs", f"--address={self.dashboard}", submission_id).stdout
                assert match.group(1).lower() == "succeeded", logs[-4000:]
                return logs
            time.sleep(2)
        logs = self.ray("job", "logs", f"--address={self.dashboard}", submission_id).stdout
        self.ray("job", "stop", f"--address={self.dashboard}", submission_id)
        raise AssertionError(f"job {submission_id} did not finish in {timeout} s; its log ends:\n{logs[-6000:]}")


@pytest.fixture(scope="module")
def s3_env() -> Iterator[dict[str, str]]:
    """moto's S3 server on 127.0.0.1 and the environment that points boto/s3fs at it."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(BUCKET)
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture(scope="module")
def cluster(s3_env) -> Iterator[Cluster]:
    """Head (1 CPU, so work must spread) + one worker node (2 CPUs), token auth, quick death detection."""
    tmp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    gcs_port, dash_port = free_port(), free_port()
    env = {
        **os.environ, **s3_env,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
        "CURATION_CACHE": str(tmp / "cache"),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    c = Cluster(tmp=tmp, env=env, gcs=f"127.0.0.1:{gcs_port}", dashboard=f"http://127.0.0.1:{dash_port}")
    head = c.ray(
        "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}", "--num-cpus=1",
        f"--resources={json.dumps({'head_node': 1})}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash_port}", f"--ray-client-server-port={free_port()}", f"--temp-dir={tmp / 'ray'}",
        "--disable-usage-stats", f"--system-config={json.dumps(RAY_SYSTEM_CONFIG)}", *own_ports(),
    )
    assert head.returncode == 0, head.stdout[-3000:] + head.stderr[-3000:]
    try:
        c.add_worker("worker_a", cpus=2)
        yield c
    finally:
        for proc in c.workers:
            _kill_group(proc)
        _kill_session(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _kill_session(tmp: Path) -> None:
    """Kill the head's processes: those whose command line names this cluster's temp dir."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if str(tmp) in cmdline:
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def _write_config(tmp: Path) -> Path:
    path = tmp / "cluster.toml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> dict:
    """The reference: the same command as one local process (embedded Ray), to a local folder."""
    tmp = tmp_path_factory.mktemp("local")
    config = _write_config(tmp)
    port = free_port()
    root = tmp / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "curate", "--output", str(root), "--samples", str(SAMPLES), "--shard-size",
         str(SHARD_SIZE), "--port", str(port), "--config", str(config), "--policies", POLICIES, "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"root": str(root), "port": port, "config": config, "tables": load_run(str(root), POLICIES), "digests": curated_digests(str(root), POLICIES)}


def test_job_on_two_nodes_into_s3_equals_a_local_run(cluster, local_run):
    output = f"s3://{BUCKET}/two-nodes"
    cluster.submit(output, local_run["port"], local_run["config"], "curate-two-nodes")
    logs = cluster.wait_job("curate-two-nodes")
    assert "Ray 2." in logs and "2 node(s)" in logs, logs[-3000:]

    got = load_run(output, POLICIES)
    assert_runs_equal(got, local_run["tables"])
    assert curated_digests(output, POLICIES) == local_run["digests"]
    ok = [r for r in got["download"] if r["status"] == "ok"]
    assert len(ok) == SAMPLES and len({r["uid"] for r in got["download"]}) == len(got["download"])

    # the stages ran on both nodes (the head has 1 CPU: it cannot hold them all)
    nodes = {n["id"]: n for n in cluster.state("nodes")}
    label = {i: next((k for k in ("head_node", "worker_a") if k in n["resources"]), "?") for i, n in nodes.items()}
    used: dict[str, set[str]] = {}
    for t in cluster.state("tasks"):
        if t["node"] and (t["name"] in {"download_shard", "reshard_shard"} or "StageActor" in t["name"]):
            used.setdefault(t["name"].split(".")[0], set()).add(label.get(t["node"], "?"))
    everywhere = set().union(*used.values())
    assert {"head_node", "worker_a"} <= everywhere, used

    # DuckDB over the S3 manifests through a registered fsspec filesystem, as a user would
    import duckdb
    import fsspec

    con = duckdb.connect()
    con.register_filesystem(fsspec.filesystem("s3"))
    count = con.sql(f"select count(*) from read_parquet('{output}/manifests/clip_score/*.parquet') where clip_status = 'ok'")
    assert count.fetchone()[0] == SAMPLES


def test_worker_node_killed_mid_stage_loses_and_duplicates_nothing(cluster, local_run):
    """SIGKILL every process of a worker node while the per-sample stages run; no node replaces it:
    the actor pools, sized for the larger cluster, are sized again for what is left, and the job
    finishes with every sample exactly once."""
    import fsspec

    output = f"s3://{BUCKET}/node-killed"
    victim = cluster.add_worker("worker_b", cpus=2)
    cluster.submit(output, local_run["port"], local_run["config"], "curate-node-killed")
    fs = fsspec.filesystem("s3")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not fs.glob(f"{BUCKET}/node-killed/manifests/ocr/part-*.parquet"):
        time.sleep(0.2)
    parts_at_kill = len(fs.glob(f"{BUCKET}/node-killed/manifests/ocr/part-*.parquet"))
    _kill_group(victim)
    total_shards = len(fs.glob(f"{BUCKET}/node-killed/manifests/download/part-*.parquet"))
    assert 1 <= parts_at_kill < total_shards, "the kill must land mid-stage for this test to mean anything"
    cluster.wait_for(lambda nodes: any("worker_b" in n["resources"] and not n["alive"] for n in nodes), "worker_b dead")
    logs = cluster.wait_job("curate-node-killed")
    assert "a node left: the cluster has 3 CPU, 0 GPU (the pools were sized for 5 CPU, 0 GPU)" in logs, logs[-4000:]
    assert "actor pools sized again" in logs

    got = load_run(output, POLICIES)
    for stage in STAGES:
        uids = [r["uid"] for r in got[stage]]
        assert len(uids) == len(set(uids)), f"{stage}: a sample twice"
    assert [r["uid"] for r in got["download"]] == [r["uid"] for r in local_run["tables"]["download"]]
    assert_runs_equal(got, local_run["tables"])
    assert curated_digests(output, POLICIES) == local_run["digests"]


def test_actors_that_cannot_start_on_a_broken_node_start_elsewhere(cluster, local_run):
    """A node where every actor fails in its constructor (a test hook stands for a bad disk or a
    lost GPU): the pools replace those actors, on the healthy nodes, and the job finishes."""
    import fsspec

    output = f"s3://{BUCKET}/broken-node"
    broken = cluster.add_worker("worker_broken", cpus=2, env={BROKEN_NODE_HOOK: "1"})
    try:
        cluster.submit(output, local_run["port"], local_run["config"], "curate-broken-node")
        logs = cluster.wait_job("curate-broken-node")
    finally:
        _kill_group(broken)
    assert "died during initialization and will be replaced" in logs, logs[-4000:]
    assert fsspec.filesystem("s3").exists(f"{BUCKET}/broken-node/curated/all/sizes.json")
    assert_runs_equal(load_run(output, POLICIES), local_run["tables"])
    assert curated_digests(output, POLICIES) == local_run["digests"]


def test_cluster_yaml_is_a_valid_launcher_config():
    """cluster.yaml passes the Ray cluster launcher's own schema check, and installs this project."""
    import yaml
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(fillout_defaults(raw))
    assert raw["file_mounts"] == {"~/clip-curation": "."}
    assert any("make setup" in c for c in raw["setup_commands"])
    # the head carries the settings of every Ray this project starts (the worker nodes take them from it)
    compact = json.dumps(RAY_SYSTEM_CONFIG, separators=(",", ":"))  # a ': ' would make YAML read a mapping
    assert any(f"--system-config='{compact}'" in c for c in raw["head_start_ray_commands"])
    assert any("gpu" in name for name in raw["available_node_types"])
    broken = dict(raw, max_workers="many")
    with pytest.raises(Exception):
        validate_config(fillout_defaults(broken))


def test_ray_submit_entry_point_runs_the_project_cli(tmp_path):
    """What `ray submit cluster.yaml pipeline/cluster_submit.py -- ...` runs on the head: the
    project's CLI from its checkout (here the repository itself), joined to the running cluster."""
    script = tmp_path / "cluster_submit.py"  # ray submit copies the file elsewhere: it must not import the project
    shutil.copy(REPO / "pipeline" / "cluster_submit.py", script)
    env = {**os.environ, "CURATION_PROJECT": str(REPO)}
    done = subprocess.run([sys.executable, str(script), "datasets"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "embedded" in done.stdout and "laion-subset" in done.stdout
    env["CURATION_PROJECT"] = str(tmp_path / "nowhere")
    done = subprocess.run([sys.executable, str(script), "datasets"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "make setup" in done.stderr


def test_the_default_run_starts_its_own_ray_beside_a_running_one(tmp_path):
    """With a `ray start --head` already up on the machine (a workstation's, a head node's) and no
    --address, `curate` runs on a Ray of its own, as --help says: Ray's own default would join the
    running one and refuse the run's CPU count with a ValueError traceback."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    # RAY_TMPDIR: where ray.init looks for a running cluster; a private one keeps this head away from
    # every other Ray on the machine, and the run below looks in the same place
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}", "--num-cpus=1",
         "--include-dashboard=false", f"--ray-client-server-port={free_port()}", "--disable-usage-stats",
         *own_ports()], env=env, capture_output=True, text=True, timeout=180)
    try:
        assert head.returncode == 0, head.stdout[-3000:] + head.stderr[-3000:]
        assert (ray_tmp / "ray" / "ray_current_cluster").exists()  # what ray.init(address=None) would join
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", "curate", "--output", str(tmp_path / "run"), "--samples", "6",
             "--shard-size", "3", "--port", str(free_port()), "--stages", "download", "--no-progress"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "Traceback" not in done.stderr
        # its own Ray: this machine's CPUs, not the running head's one
        assert re.search(rf"1 node\(s\), {os.cpu_count()} CPU", done.stderr), done.stderr[-2000:]
    finally:
        _kill_session(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
