"""Multi-node for real: separate hosts (network namespaces on a private bridge, tests/hosts.sh), each with
its own address and hostname, under SLURM (slurm/cluster.sh start --nodes 2: slurmctld on its own host, one
slurmd per node) and under torchrun without SLURM (launch/multi_node.sh, c10d store on a third host); then
a host fails (link down, every process SIGKILLed) or is partitioned (link down, processes alive).

- `sbatch --nodes=2 slurm/train.sh` with one worker per node ends bitwise equal to one node with two
  workers: gloo's allreduce of two ranks gives the same bits over a bridge as over loopback.
- Node failure, fixed size: SLURM marks the node DOWN after SlurmdTimeout, requeues the job, and once the
  node is back the job resumes from the latest complete snapshot and ends bitwise equal to the reference.
- Node failure, MIN_NODES=1 (elastic, `sbatch --no-kill`): the surviving node goes on at world size 1 inside
  the allocation; every epoch's samples are seen once.
- torchrun across hosts: a killed host, and a partitioned one, end in the survivor continuing from the
  latest complete snapshot at world size 1; the partitioned host's workers are gone before the new world
  starts, and when its link comes back its agent finds the rendezvous closed and exits.
- torchrun across three hosts, a local snapshot every step: each host's memory holds a part of it (its own
  ranks' files and its predecessor's); after a host is killed, the survivors complete the newest local
  snapshot from their parts and continue from it.

Every test prints the time from the failure to the first resumed step. Hosts and daemons are removed at
module end and that is asserted, also when a test failed. Needs root; skipped with the reason elsewhere,
failed instead under ELASTICTRAIN_REQUIRE_SLURM=1 (CI).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from elastic_util import (RDZV_CONF, Jobs, check_sample_offsets, events, read_records, train_records,
                          wait_for_record, worker_env)
from elastictrain.faults import FaultInjector
from elastictrain.snapshot import localtier, manifest
from helpers import assert_bitwise_equal, load_final, tiny_args, wait_for
from multinode_util import (alive, fail_host, hosts, leftovers, on_host, partition, pids_on, require_root,
                            skip_or_fail, stopped)
from slurm_util import cancel, cluster, job_info, job_log, poll, sbatch, wait_final

# Not `alone` (conftest.py): its bounds on finding a lost host (a third of the default collective timeout,
# against 6-14 s measured under two test workers) leave room for a second job's load, and its tests drive
# the multi-host cluster and test hosts one at a time because a module's tests stay on one worker (loadfile).

NODES_DIR = Path("/tmp/elastictrain-slurm-nodes")
NODES_CONF = NODES_DIR / "slurm.conf"
NODES = ["et-node1", "et-node2"]
DEFAULT_TIMEOUT_S = 300  # the default --dist.timeout_s
LIVENESS_WINDOW_S = 150  # far below it: the liveness heartbeats must end the lost world long before


# ------------------------------------------------------------------------------------------ test hosts


def test_hosts_script_makes_and_removes_exactly_its_hosts(tmp_path: Path) -> None:
    """Two hosts with their own names and addresses that reach each other by name; a downed link cuts
    them apart and an upped one joins them again; each has its own /dev/shm, kept from one command to the
    next until `wipe`; `up` twice changes nothing; a namespace that is not ours is refused and survives
    `down`; after `down` (twice) nothing of the set is left."""
    require_root("test hosts")
    foreign = "hz2"  # stands for somebody else's namespace that happens to carry a name we would use
    names = ["hy1", "hy2"]
    hosts("up", "hy", "2")
    subprocess.run(["ip", "netns", "add", foreign], check=True, timeout=10)
    try:
        subnet = (Path("/run/elastictrain-hosts/hy/subnet")).read_text().strip()
        hosts("up", "hy", "2")  # idempotent
        assert Path("/run/elastictrain-hosts/hy/subnet").read_text().strip() == subnet
        assert run_on("hy1", "hostname").strip() == "hy1"
        assert run_on("hy2", "getent", "hosts", "hy1").split()[0] == f"{subnet}.1"
        routes = run_on("hy1", "ip", "-4", "route").strip().splitlines()
        assert routes == [f"{subnet}.0/24 dev eth0 proto kernel scope link src {subnet}.1"], routes
        assert talk("hy1", "hy2") == "hy1 -> hy2"
        hosts("link", "hy2", "down")
        assert "timed out" in talk("hy1", "hy2", timeout=1)
        hosts("link", "hy2", "up")
        assert talk("hy1", "hy2") == "hy1 -> hy2"
        run_on("hy1", "sh", "-c", "echo memory > /dev/shm/et-test")
        assert run_on("hy1", "cat", "/dev/shm/et-test") == "memory\n"  # kept between commands
        assert run_on("hy2", "ls", "/dev/shm") == "" and not Path("/dev/shm/et-test").exists()  # its own
        hosts("wipe", "hy1")
        assert run_on("hy1", "ls", "/dev/shm") == ""
        refused = hosts("up", "hz", "2", check=False)
        assert refused.returncode == 1 and "hz2 exists but is not ours" in refused.stderr
        assert not leftovers("hz", ["hz1"]) and Path(f"/run/netns/{foreign}").exists()
    finally:
        hosts("down", "hy")
        hosts("down", "hy")
        hosts("down", "hz")
        assert Path(f"/run/netns/{foreign}").exists(), "down removed a namespace it did not make"
        subprocess.run(["ip", "netns", "del", foreign], check=True, timeout=10)
    assert not leftovers("hy", names)


def run_on(host: str, *cmd: str) -> str:
    return subprocess.run(on_host(host, list(cmd)), capture_output=True, text=True, check=True, timeout=30).stdout


def talk(client: str, server: str, timeout: float = 5) -> str:
    """A TCP round trip from ``client`` to ``server`` by name: what the server heard, or the client's error."""
    serve = ("import socket; s = socket.create_server(('0.0.0.0', 5599)); c, _ = s.accept(); "
             "c.sendall(c.recv(64) + b' -> ' + socket.gethostname().encode())")
    ask = (f"import socket, sys\ntry:\n    c = socket.create_connection(('{server}', 5599), timeout={timeout})\n"
           f"    c.sendall(socket.gethostname().encode()); print(c.recv(64).decode())\n"
           f"except OSError as e:\n    print(e)\n")
    srv = subprocess.Popen(on_host(server, [sys.executable, "-c", serve]))
    try:
        for _ in range(50):
            out = run_on(client, sys.executable, "-c", ask).strip()
            if "refused" not in out:  # the server may not listen yet
                return out
            time.sleep(0.1)
        return out
    finally:
        srv.kill()
        srv.wait()


# ------------------------------------------------------------------------------------------ 2-node SLURM


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[None]:
    """A 2-node SLURM for this module; stopped at the end, and then its daemons and hosts must be gone
    (one that was already running is reused and left running)."""
    require_root("multi-node SLURM tests")
    was_running = cluster("status", state_dir=NODES_DIR).returncode == 0
    started = cluster("start", "--nodes", "2", state_dir=NODES_DIR)
    if started.returncode != 0:
        cluster("stop", state_dir=NODES_DIR)
        skip_or_fail(f"slurm/cluster.sh start --nodes 2 failed: {started.stderr.strip()[-1500:]}")
    try:
        yield
    finally:
        if not was_running:
            stop_two_nodes()


def stop_two_nodes() -> None:
    daemons = [int(p.read_text()) for p in NODES_DIR.glob("*.pid") if p.read_text().strip().isdigit()]
    stopped_ = cluster("stop", state_dir=NODES_DIR)
    assert stopped_.returncode == 0, stopped_.stderr
    assert not [p for p in daemons if alive(p)], "daemons of the 2-node cluster survived stop"
    assert not leftovers("etslurm", ["et-ctl", *NODES]), "hosts of the 2-node cluster survived stop"


@pytest.fixture
def submit(two_nodes: None, tmp_path: Path) -> Iterator[Callable[..., tuple[int, Path]]]:
    """``submit(run_dir, *sbatch_args, extra=(trainer flags), **job_env)`` -> (job id, output file): slurm/train.sh
    on the 2-node cluster, one worker per node. Teardown kills the jobs and brings every node back."""
    jobs: list[int] = []

    def _submit(run_dir: Path, *sbatch_args: str, extra: tuple[str, ...] = (), **env: str) -> tuple[int, Path]:
        out = tmp_path / f"{run_dir.name}.out"
        job = sbatch(tiny_args(run_dir, *extra), out, "--nodes=2", "--cpus-per-task=1", *sbatch_args,
                     conf=NODES_CONF, NPROC_PER_NODE="1", **env)
        jobs.append(job)
        return job, out

    yield _submit
    cancel(*jobs, conf=NODES_CONF)
    back = cluster("start", "--nodes", "2", state_dir=NODES_DIR)  # a failed host's link and slurmd come back
    assert back.returncode == 0, back.stderr


@pytest.mark.slow
@pytest.mark.slurm
def test_two_node_sbatch_equals_one_node_with_two_workers(submit, reference_runs: dict[int, Path],
                                                          tmp_path: Path) -> None:
    run_dir = tmp_path / "two-node"
    job, out = submit(run_dir)
    info = wait_final(job, out, conf=NODES_CONF)
    log = job_log(out)
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "et-node[1-2]", f"{info}\n{log[-4000:]}"
    assert "on et-node1: 2 node(s) x 1 worker(s) (fixed size), rendezvous et-node1:" in log
    (start,) = events(read_records(run_dir), "start")
    assert start["world_size"] == 2
    assert_bitwise_equal(load_final(run_dir), load_final(reference_runs[2]))


def frozen_node(marker: Path, timeout: float = 180) -> str:
    """The node on which the ``hang`` fault stopped a worker (once its marker exists)."""
    wait_for(marker.exists, timeout, f"the hang fault ({marker.name})")
    found: list[str] = []

    def frozen() -> bool:
        found[:] = [n for n in NODES if any(stopped(p) for p in pids_on(n))]
        return bool(found)

    wait_for(frozen, 10, "a stopped worker")
    return found[0]


@pytest.mark.slow
@pytest.mark.slurm
def test_node_failure_requeues_and_resumes_bit_exact_when_the_node_is_back(
        submit, reference_runs: dict[int, Path], tmp_path: Path) -> None:
    """Rank 1 freezes right after the epoch-1 snapshot was written (``hang`` fault: the kill point is exact,
    and the snapshot complete), then its host fails. The DEFAULT --dist.timeout_s: rank 0 finds rank 1 silent
    (liveness heartbeat) and exits; SLURM notices after SlurmdTimeout, requeues the job, it waits for two
    nodes; the host comes back and the job resumes from the step-4 snapshot at world size 2 and ends bitwise
    equal to the uninterrupted run."""
    run_dir, fault = tmp_path / "requeue", "hang@saved=4:rank=1"
    job, out = submit(run_dir, extra=("--debug.fault", fault))
    node = frozen_node(FaultInjector(fault, run_dir, 1).marker)
    fail_host(node)
    failed = time.time()
    lost = f"lost rank 1 on host {node}: no heartbeat for"
    wait_for(lambda: lost in (run_dir / "train.log").read_text(), LIVENESS_WINDOW_S,
             "the survivor to report rank 1 lost")
    survivor_exited = time.time()
    poll(lambda: int(job_info(job, NODES_CONF).get("Restarts", 0)) >= 1, LIVENESS_WINDOW_S,
         "SLURM to requeue the job", lambda: f"{job_info(job, NODES_CONF)}\n{job_log(out)[-4000:]}")
    requeued = time.time()
    back = cluster("start", "--nodes", "2", state_dir=NODES_DIR)
    assert back.returncode == 0, back.stderr
    returned = time.time()
    info = wait_final(job, out, conf=NODES_CONF)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{job_log(out)[-4000:]}"
    records = read_records(run_dir)
    (resume,) = events(records, "resume")
    assert (resume["step"], resume["world_size"], resume["restart_count"]) == (4, 2, 1), resume
    check_sample_offsets(records)
    assert_bitwise_equal(load_final(run_dir), load_final(reference_runs[2]))
    first = first_step_after(records, resume)
    print(f"\nSLURM requeue: {node} failed; the survivor reported it {survivor_exited - failed:.1f}s later, "
          f"job requeued {requeued - failed:.1f}s later; node back after "
          f"{returned - failed:.1f}s; first resumed step {first['time'] - failed:.1f}s after the failure "
          f"({first['time'] - returned:.1f}s after the node was back)")


@pytest.mark.slow
@pytest.mark.slurm
def test_node_failure_with_min_nodes_shrinks_inside_the_allocation(submit, tmp_path: Path) -> None:
    """MIN_NODES=1 and `sbatch --no-kill`: the node that does not run the batch script fails mid-run; the
    other goes on at world size 1 in the same allocation (no requeue), every epoch's samples seen once. The
    DEFAULT --dist.timeout_s: the liveness heartbeats end the lost world, far below that timeout."""
    run_dir = tmp_path / "elastic"
    job, out = submit(run_dir, "--no-kill", extra=("--epochs", "8"), MIN_NODES="1", RDZV_CONF="join_timeout=60")
    wait_for_record(run_dir, lambda r: r["kind"] == "train" and r["step"] >= 6, 180, "step 6 at world size 2")
    wait_committed(run_dir)
    fail_host("et-node2")
    failed = time.time()
    info = wait_final(job, out, conf=NODES_CONF)
    log = job_log(out)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", f"{info}\n{log[-4000:]}"
    assert "(elastic, 1..2 nodes), rendezvous et-node1:" in log and "rendezvous store ready" in log
    assert "training finished (trainer exit 0)" in log
    records = read_records(run_dir)
    resume = events(records, "resume")[-1]
    assert (resume["previous_world_size"], resume["world_size"]) == (2, 1), resume
    sizes = [r["world_size"] for r in train_records(records)]
    assert sizes[0] == 2 and sizes[-1] == 1 and max(r["step"] for r in train_records(records)) == 32
    check_sample_offsets(records)
    said = "".join(p.read_text() for p in [run_dir / "train.log", *run_dir.glob("logs/rank*.log")])
    assert "lost rank 1 on host et-node2: no heartbeat for" in said or "lost the c10d store " in said, said[-3000:]
    first = first_step_after(records, resume)
    assert first["time"] - failed < DEFAULT_TIMEOUT_S / 3
    print(f"\nSLURM elastic: et-node2 failed; first step at world size 1 {first['time'] - failed:.1f}s later")


def first_step_after(records: list[dict[str, Any]], resume: dict[str, Any]) -> dict[str, Any]:
    return next(r for r in train_records(records) if r["time"] >= resume["time"] and r["step"] == resume["step"] + 1)


# --------------------------------------------------------------------------------- torchrun across hosts


@pytest.fixture(scope="module")
def three_hosts() -> Iterator[list[str]]:
    """Hosts tr1 and tr2 for the agents, tr3 for the c10d store; removed (and checked) at module end."""
    require_root("multi-host torchrun tests")
    names = ["tr1", "tr2", "tr3"]
    hosts("up", "tr", "3")
    try:
        yield names
    finally:
        hosts("down", "tr")
        assert not leftovers("tr", names), "test hosts survived tests/hosts.sh down"


@pytest.fixture
def cross_host(three_hosts: list[str], tmp_path: Path) -> Iterator[Callable[..., dict[str, Any]]]:
    """``start(run_dir, *trainer flags, on=("tr1", "tr2"), nnodes="1:2")``: a c10d store on tr3 (`multi_node.sh
    store`, at the first call), then `launch/multi_node.sh` on each host of ``on`` (a later call: an agent of
    the same job, as on a replaced machine); returns the agents by host. Every process on the hosts is killed
    at teardown, and every link is up again."""
    jobs = Jobs(tmp_path)
    job: dict[str, str] = {}

    def start(run_dir: Path, *extra: str, on: tuple[str, ...] = ("tr1", "tr2"), nnodes: str = "1:2") -> dict[str, Any]:
        port = 29400
        if not job:
            job["rdzv_id"] = uuid.uuid4().hex[:12]
            jobs.start(on_host("tr3", ["bash", "launch/multi_node.sh", "store", str(port)]), "store",
                       PYTHON=sys.executable)
        env = {"PYTHON": sys.executable, "RDZV_ENDPOINT": f"tr3:{port}", "RDZV_ID": job["rdzv_id"], "NNODES": nnodes,
               "NPROC": "1", "SHUTDOWN_TIMEOUT": "5", "RDZV_CONF": RDZV_CONF}
        return {h: jobs.start(on_host(h, ["bash", "launch/multi_node.sh", *tiny_args(run_dir, *extra)]),
                              h, **env) for h in on}

    try:
        yield start
    finally:
        for h in three_hosts:
            hosts("link", h, "up")
            hosts("kill", h)
        jobs.cleanup()
    assert not jobs.leftovers(), "processes of this test survived the clean-up"


def host_of_rank0() -> str:
    found: list[str] = []

    def find() -> bool:
        found[:] = [h for h in ("tr1", "tr2") if any(worker_env(p, "RANK") == "0" for p in pids_on(h))]
        return bool(found)

    wait_for(find, 30, "the worker of rank 0")
    return found[0]


def committed_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.rsplit("step", 1)[1]) for p in (run_dir / "snapshots").glob("*/COMMIT.json"))


def wait_committed(run_dir: Path) -> None:
    """The premise of a resume: a complete snapshot (epoch 1's commits in the background while epoch 2 trains)."""
    wait_for(lambda: (run_dir / "snapshots" / "epoch00001-step00000004" / "COMMIT.json").exists(), 60,
             "the epoch-1 snapshot committed")


def training_on_two_hosts(cross_host: Callable[..., dict[str, Any]], run_dir: Path,
                          *extra: str) -> tuple[dict[str, Any], str, str, int]:
    """Agents on tr1 and tr2 past step 6 at world size 2, the epoch-1 snapshot committed: (the agents, the host
    of rank 0, the other host, the newest committed step). The DEFAULT --dist.timeout_s (300 s): the
    liveness heartbeats (elastictrain/liveness.py) must notice a lost host, not the collective timeout."""
    agents = cross_host(run_dir, "--epochs", "8", *extra)
    wait_for_record(run_dir, lambda r: r["kind"] == "train" and r["world_size"] == 2 and r["step"] >= 6, 300,
                    "step 6 at world size 2", agents["tr2"])
    wait_committed(run_dir)
    rank0 = host_of_rank0()
    return agents, rank0, "tr2" if rank0 == "tr1" else "tr1", committed_steps(run_dir)[-1]


KILLED_HOST_RUNS = {"store": ("--dist.strategy", "fsdp"), "peer": ("--checkpoint.engine", "dcp"),
                    "fsdp-torchsnapshot": ("--dist.strategy", "fsdp"), "ddp-dcp": ("--checkpoint.engine", "dcp")}
"""Both engines and both strategies in the two cases: FSDP2 with torchsnapshot, DDP with DCP."""


@pytest.mark.slow
@pytest.mark.parametrize("which", ["store", "peer"])
def test_torchrun_across_hosts_survives_a_killed_host(cross_host, tmp_path: Path, which: str) -> None:
    """A host dies mid-run (link cut, then its processes killed: no FIN); the other continues at world size 1
    and finishes, with the default collective timeout. ``store``: the host of rank 0, whose worker hosts the
    job's c10d store: the survivor names the store. ``peer``: the other host: the survivor names its rank,
    host and silence. A local snapshot every step: each host holds a whole copy of it in its own memory (also
    of the lost host's FSDP2 shards), so the survivor continues from its local copy, at most one step back,
    not from the older durable one."""
    run_dir = tmp_path / "run"
    agents, rank0, rank1, latest = training_on_two_hosts(cross_host, run_dir, "--checkpoint.local_every_steps", "1",
                                                         *KILLED_HOST_RUNS[which])
    lost, survivor = (rank0, rank1) if which == "store" else (rank1, rank0)
    fail_host(lost)
    failed = time.time()
    assert agents[survivor].wait(LIVENESS_WINDOW_S) == 0
    said = (run_dir / ("logs/rank1.log" if which == "store" else "train.log")).read_text()
    expected = "lost the c10d store " if which == "store" else f"lost rank 1 on host {lost}: no heartbeat for"
    assert expected in said, said[-3000:]
    records = read_records(run_dir)
    resume = events(records, "resume")[-1]
    assert (resume["previous_world_size"], resume["world_size"]) == (2, 1) and resume["step"] >= latest, resume
    before = max(r["step"] for r in train_records(records) if r["world_size"] == 2)
    assert resume["tier"] == "local" and resume["step"] >= before - 1 and "transfer" not in resume, (before, resume)
    check_sample_offsets(records)
    first = first_step_after(records, resume)
    assert first["time"] - failed < DEFAULT_TIMEOUT_S / 3
    print(f"\ntorchrun, killed host ({which}): {lost} failed; first step at world size 1 on {survivor} "
          f"{first['time'] - failed:.1f}s later")


@pytest.mark.slow
def test_torchrun_across_hosts_replaced_host_gets_the_local_snapshot_from_its_peer(
        cross_host, reference_runs: dict[int, Path], tmp_path: Path) -> None:
    """A fixed two-node job (NNODES=2), a local snapshot every step. The host without rank 0 dies and comes
    back with empty memory (a replaced machine: `hosts.sh wipe`); its new agent joins, and the world of two
    continues from the newest local snapshot, which the replaced host received from its peer (not from the
    older durable one), and ends bitwise equal to the uninterrupted run."""
    run_dir = tmp_path / "run"
    # Also: the durable writer of the node without rank 0 dies alone copying its share of epoch 1's snapshot.
    flags = ("--checkpoint.local_every_steps", "1", "--debug.fault", "sigkill@writer=4:rank=1")
    agents = cross_host(run_dir, *flags, nnodes="2")
    wait_for_record(run_dir, lambda r: r["kind"] == "train" and r["step"] >= 6, 300, "step 6", agents["tr2"])
    survivor = host_of_rank0()
    lost = "tr2" if survivor == "tr1" else "tr1"
    fail_host(lost)
    hosts("wipe", lost)
    hosts("link", lost, "up")
    failed = time.time()
    agents.update(cross_host(run_dir, *flags, on=(lost,), nnodes="2"))  # the same config (the fault fired)
    assert agents[survivor].wait(LIVENESS_WINDOW_S) == 0 and agents[lost].wait(60) == 0
    records = read_records(run_dir)
    (resume,) = events(records, "resume")
    before = max(r["step"] for r in train_records(records) if r["time"] < failed)
    assert resume["tier"] == "local" and resume["world_size"] == 2 and resume["step"] >= before - 1, (before, resume)
    assert resume["transfer"]["from_host"] == survivor and resume["transfer"]["bytes"] > 0, resume
    assert f"copied from rank {resume['transfer']['from_rank']} on host {survivor} to {lost}" in \
        (run_dir / "train.log").read_text()
    check_sample_offsets(records)
    assert_bitwise_equal(load_final(run_dir), load_final(reference_runs[2]))
    said = (run_dir / "train.log").read_text()
    assert "durable snapshot epoch00001-step00000004 not written: the durable writer process died (signal " \
        "SIGKILL)" in said, said[-3000:]
    assert_durable_copies_from_memory(run_dir, nodes=(2,))
    print(f"\ntorchrun, replaced host: {lost} replaced; it received {resume['transfer']['bytes']} bytes in "
          f"{resume['transfer']['seconds']}s; first step {first_step_after(records, resume)['time'] - failed:.1f}s "
          f"after the failure")


@pytest.mark.slow
def test_torchrun_across_hosts_partitioned_host_never_writes_beside_the_new_world(cross_host,
                                                                                   tmp_path: Path) -> None:
    """The host of rank 0 loses its link but keeps running. Its worker finds its peer silent (liveness
    heartbeat, default --dist.timeout_s) and exits, the other finds the store silent and exits; the other host's agent drops it from the rendezvous and continues at world
    size 1 from the latest complete snapshot, and only after the partitioned workers are gone. When the
    link comes back, the partitioned agent finds the rendezvous closed (the job finished) and exits."""
    run_dir = tmp_path / "run"
    agents, cut, survivor, latest = training_on_two_hosts(cross_host, run_dir)
    partition(cut)
    parted = time.time()

    def old_workers() -> list[int]:
        return [p for p in pids_on(cut) if worker_env(p, "RANK") is not None]

    assert old_workers(), "the partitioned host's worker runs on"
    wait_for(lambda: not old_workers(), LIVENESS_WINDOW_S, "the partitioned host's workers to exit", interval=0.05)
    old_gone = time.time()
    assert agents[cut].poll() is None, "the partitioned agent is alive (it cannot reach the store)"
    assert agents[survivor].wait(300) == 0
    records = read_records(run_dir)
    (resume,) = events(records, "resume")
    assert (resume["previous_world_size"], resume["world_size"]) == (2, 1), resume
    old_steps = [r["step"] for r in train_records(records) if r["world_size"] == 2]
    # Latest complete: at least the newest commit seen before the cut (one in flight may have landed since).
    assert latest <= resume["step"] <= max(old_steps), (latest, resume, max(old_steps))
    assert old_gone < resume["time"], "the partitioned world's workers outlived the new world's start"
    assert not [r for r in records if r["time"] > parted and r.get("world_size") == 2], "the old world went on"
    assert not old_workers(), "the partitioned agent started workers again (a second world)"
    check_sample_offsets(records)
    hosts("link", cut, "up")
    healed = time.time()
    rc = agents[cut].wait(180)
    print(f"\ntorchrun, partitioned host: {cut} cut off; its workers exited {old_gone - parted:.1f}s later; "
          f"the new world resumed {resume['time'] - parted:.1f}s and took its first step "
          f"{first_step_after(records, resume)['time'] - parted:.1f}s after the cut; after the heal its agent "
          f"exited {rc} in {time.time() - healed:.1f}s")
    assert rc != 0
    assert len(events(read_records(run_dir), "resume")) == 1, "the healed host started a world of its own"
    assert "lost rank 1 on host " in (run_dir / "train.log").read_text()  # the cut-off side stopped itself
    assert "lost the c10d store " in (run_dir / "logs/rank1.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("run", ["fsdp-torchsnapshot", "ddp-dcp"])
def test_torchrun_across_three_hosts_holds_parts_in_a_ring_and_survives_a_lost_host_from_memory(
        cross_host, tmp_path: Path, run: str) -> None:
    """Three hosts (NNODES=2:3), a local snapshot every step: each host's memory holds only its own files of a
    local snapshot and its predecessor's in the ring (a PART.json, no commit record). A host other than rank
    0's and the store's dies; the two survivors complete the newest local snapshot from their parts and
    continue at world size 2 from it, at most one step back, not from the older durable one. FSDP2 with
    torchsnapshot and DDP with DCP, as in the two-host case."""
    run_dir = tmp_path / "run"
    # 48 samples in batches of 12: 4 steps an epoch at world size 3 and 2 alike.
    agents = cross_host(run_dir, "--epochs", "8", "--data.train_samples", "48", "--train.batch_size", "12",
                        "--checkpoint.local_every_steps", "1", *KILLED_HOST_RUNS[run], on=("tr1", "tr2", "tr3"),
                        nnodes="2:3")
    # Six steps at world size 3 (its world may start from a world of two that the third host joined, and
    # resume from that world's whole copy): its newer local snapshots are the ring's, and an epoch's durable
    # snapshot is copied from the three hosts' memory, each host's writer copying its share.
    wait_for(lambda: len([r for r in train_records(read_records(run_dir)) if r["world_size"] == 3]) >= 6, 300,
             "six steps at world size 3")
    wait_for(lambda: "by the writer processes of 3 nodes" in (run_dir / "train.log").read_text(), 60,
             "a durable snapshot copied by three hosts' writers")
    tier = localtier.of_run(run_dir)[1]  # this run's: the hosts' memory also holds earlier tests' tiers
    assert tier, "the run has no local tier id"
    for h in ("tr1", "tr2", "tr3"):  # each host's memory (tests/hosts.sh): its newest local snapshot is a part
        marker, part = newest_local_marker(h, tier)
        assert marker.name == "PART.json" and 0 < len(part["held"]) < len(part["record"]["files"]), (marker, part)
    found: list[str] = []
    wait_for(lambda: bool(found.extend(h for h in ("tr1", "tr2", "tr3")
                                       if any(worker_env(p, "RANK") == "0" for p in pids_on(h))) or found), 30,
             "the worker of rank 0")
    lost = next(h for h in ("tr1", "tr2") if h != found[0])
    fail_host(lost)
    failed = time.time()
    survivors = [h for h in ("tr1", "tr2", "tr3") if h != lost]
    assert all(agents[h].wait(LIVENESS_WINDOW_S) == 0 for h in survivors)
    records = read_records(run_dir)
    resume = events(records, "resume")[-1]
    before = max(r["step"] for r in train_records(records) if r["world_size"] == 3)
    assert (resume["previous_world_size"], resume["world_size"]) == (3, 2), resume
    assert resume["tier"] == "local" and resume["step"] >= before - 1, (before, resume)
    assert resume["transfer"]["assembled"] == Path(resume["snapshot"]).name and resume["transfer"]["bytes"] > 0
    assert "completed on every node from the parts held on" in (run_dir / "train.log").read_text()
    check_sample_offsets(records, batch=12)
    assert_durable_copies_from_memory(run_dir, nodes=(3, 2))
    print(f"\ntorchrun, three hosts: {lost} failed; the survivors completed {resume['transfer']['assembled']} "
          f"from their parts ({resume['transfer']['bytes']} bytes in {resume['transfer']['seconds']}s); first "
          f"step at world size 2 {first_step_after(records, resume)['time'] - failed:.1f}s after the failure")


def assert_durable_copies_from_memory(run_dir: Path, nodes: tuple[int, ...]) -> None:
    """Every durable snapshot the run kept was copied from the local tier by the nodes' writer processes
    (copier.py) and verifies, every byte; the log names each number of nodes in ``nodes`` doing so."""
    kept = [s for s in manifest.list_snapshots(run_dir / "snapshots") if s.complete]
    assert kept, "no durable snapshot"
    for snap in kept:
        assert snap.commit["copied_from"] == "local" and snap.verify() is None, (snap.path, snap.verify())
    said = (run_dir / "train.log").read_text()
    for n in nodes:
        assert f"copied from the local tier by the writer processes of {n} nodes" in said, said[-3000:]


def newest_local_marker(host: str, tier: str) -> tuple[Path, dict[str, Any]]:
    """The commit record or PART.json of the newest local snapshot of tier ``tier`` in ``host``'s memory that
    has one, read."""
    for _ in range(50):  # retention may remove one between the listing and the read
        found = Path("/run/elastictrain-hosts/tr").glob(f"shm-{host}/elastictrain-*/{tier}/snapshots/*/*.json")
        marked = sorted(found, key=lambda m: m.parent.name)
        try:
            return marked[-1], json.loads(marked[-1].read_text())
        except (IndexError, FileNotFoundError):
            time.sleep(0.1)
    raise AssertionError(f"no local snapshot in the memory of {host}")
