"""The Slurm launcher: the 78B job on 128 nodes renders with a checked layout, bad requests are
refused before sbatch, and the batch script requeues only a preempted run, up to its limit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_internvl.launch.task import slurm_to_torch_env
from tests.harness import free_port as _free_port

ROOT = Path(__file__).resolve().parents[1]
DATA = ["data.shards=[/data/shards]", "data.tokenizer=/models/tok"]
IMAGE = "cluster.container_image=registry.example.com/megatron-internvl:1"


def _launch(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megatron_internvl.launch", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
    )


def _dry_run(*args: str) -> str:
    result = _launch(*args, "--dry-run")
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_78b_on_128_nodes_renders_a_checked_layout():
    script = _dry_run(
        "recipe=internvl2_5_78b_stage2", "cluster=h100_pyxis", "cluster.nodes=128", IMAGE, *DATA
    )
    for line in (
        "#SBATCH --nodes=128",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --signal=USR1@300",
        "#SBATCH --requeue",
        "# Layout: tp8 x pp4 x cp1 x dp32 = 1024 ranks (128 nodes x 8 per node)",
        "#SBATCH --exclusive",
        "#SBATCH --cpus-per-task=16",
        "#SBATCH --mem=0",
        "export CUDA_DEVICE_MAX_CONNECTIONS=1",
        "export MEGATRON_INTERNVL_REQUEUE_FILE=",
    ):
        assert line in script, line
    assert "srun --kill-on-bad-exit=1" in script
    assert f"--container-workdir={ROOT}" in script
    assert "python -m megatron_internvl.launch.task recipe=internvl2_5_78b_stage2" in script
    check = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr


def test_container_settings_reach_srun(tmp_path):
    image = tmp_path / "img.sqsh"
    image.write_bytes(b"")
    script = _dry_run(
        "recipe=internvl2_5_8b_stage2",
        "cluster=h100_pyxis",
        f"cluster.container_image={image}",
        "cluster.container_mounts=[/d:/data]",
        "+cluster.env.NCCL_DEBUG=WARN",
        *DATA,
    )
    assert (
        f"--container-image={image} --container-workdir={ROOT} --container-mounts=/d:/data"
        in script
    )
    assert "export NCCL_DEBUG=WARN" in script


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["recipe=internvl2_5_78b_stage2", "cluster=h100_pyxis", "cluster.nodes=3", IMAGE],
            "does not divide 24 GPUs",
        ),
        (["recipe=internvl2_5_8b_stage2", "cluster=h100_pyxis"], "names no image"),
        (
            ["recipe=demo_cpu", "cluster=local_cpu", "cluster.max_requeues='3; touch x'"],
            "cluster.max_requeues='3; touch x': expected a whole number",
        ),
        (
            ["recipe=demo_cpu", "cluster=local_cpu", "cluster.python=python"],
            "absolute path of the project's venv interpreter",
        ),
        (
            [
                "recipe=internvl2_5_8b_stage2",
                "cluster=h100_pyxis",
                "cluster.container_image=/no/such/image.sqsh",
            ],
            "does not exist",
        ),
        (["recipe=internvl2_5_9b_stage2", "cluster=h100_pyxis", IMAGE], "internvl2_5_8b_stage2"),
        (
            ["recipe=internvl2_5_8b_stage2", "cluster=h100_pyxis", IMAGE, "+cluster.gpu_count=8"],
            "unknown cluster settings",
        ),
    ],
)
def test_impossible_requests_are_refused_before_sbatch(args, message):
    result = _launch(*args, *DATA, env={"PATH": "/nonexistent"})  # sbatch unreachable anyway
    assert result.returncode == 2
    assert message in result.stderr, result.stderr[-2000:]


def test_slurm_task_variables_become_torch_ones():
    env = {
        "SLURM_PROCID": "9",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS_PER_NODE": "8(x2)",
    }
    assert slurm_to_torch_env(env) == {
        "RANK": "9",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "8",
    }


def _fake_slurm(tmp_path: Path, srun_exit: int) -> Path:
    """srun stand-in: exits with `srun_exit`; on 75 (or 143: a rank killed while exiting) rank 0
    has written the requeue file first, as training does after a preemption save."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    writes = 'echo 4 > "$MEGATRON_INTERNVL_REQUEUE_FILE"' if srun_exit in (75, 143) else ""
    (bin_dir / "srun").write_text(f"#!/bin/bash\n{writes}\nexit {srun_exit}\n")
    (bin_dir / "scontrol").write_text(
        '#!/bin/bash\nif [ "$1" = show ]; then echo node1; else echo "$@" >> '
        f"{tmp_path}/scontrol.log; fi\n"
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize(
    ("srun_exit", "attempt", "requeued", "status"),
    [(75, 0, True, 0), (143, 0, True, 0), (75, 3, False, 75), (1, 0, False, 1), (0, 0, False, 0)],
)
def test_batch_script_requeues_only_preempted_runs(tmp_path, srun_exit, attempt, requeued, status):
    script = _dry_run("recipe=demo_cpu", "cluster=local_cpu", f"output_dir={tmp_path}")
    bin_dir = _fake_slurm(tmp_path, srun_exit)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_RESTART_COUNT": str(attempt),
        "SLURM_JOB_NODELIST": "node1",
    }
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == status, result.stdout + result.stderr
    log = tmp_path / "scontrol.log"
    assert (log.read_text().strip() == "requeue 4242") if requeued else not log.exists()
    assert (tmp_path / "demo_cpu" / "logs" / f"job4242-attempt{attempt}").is_dir()


# --- hostile values ------------------------------------------------------------------------

SPELL = "$(touch {m}) `touch {m}` \"dq\" 'sq' two  spaces; touch {m} \\ end"


def _recording_slurm(tmp_path: Path) -> Path:
    """srun stand-in that records its arguments and $HOSTILE byte for byte."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        f"#!/bin/bash\nprintf '%s\\0' \"$@\" > {tmp_path}/argv\n"
        f"printf '%s' \"$HOSTILE\" > {tmp_path}/env\n"
    )
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho node1\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


def test_hostile_values_arrive_intact_and_nothing_runs(tmp_path):
    from megatron_internvl.launch import slurm

    marker = tmp_path / "PWNED"
    one_line = SPELL.format(m=marker)
    multi_line = one_line + "\nsecond line; touch " + str(marker)
    cluster = slurm.cluster_config(
        {
            "nodes": 1,
            "gpus_per_node": 0,
            "tasks_per_node": 2,
            "time": "00:10:00",
            "container": "pyxis",
            "container_image": one_line,
            "container_mounts": [one_line],
            "container_workdir": one_line,
            "env": {"HOSTILE": multi_line},
            "python": one_line,
        }
    )
    override = f"data.tokenizer={multi_line}"
    script = slurm.render("job", tmp_path / "run", [override], cluster, "layout")
    check = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr
    env = {
        **os.environ,
        "PATH": f"{_recording_slurm(tmp_path)}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NODELIST": "node1",
    }
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    argv = (tmp_path / "argv").read_bytes().decode().split("\0")[:-1]
    assert f"--container-image={one_line}" in argv
    assert f"--container-mounts={one_line}" in argv
    assert f"--container-workdir={one_line}" in argv
    assert argv[-4:] == [one_line, "-m", "megatron_internvl.launch.task", override]
    assert (tmp_path / "env").read_text() == multi_line
    assert not marker.exists()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("partition", "batch\ntouch /tmp/x", "partition names"),
        ("account", "$(touch /tmp/x)", "Slurm account name"),
        ("time", "04:00:00\ntouch /tmp/x", "Slurm time limit"),
        ("mem", "10G`touch /tmp/x`", "Slurm memory size"),
        ("max_requeues", "3\ntouch /tmp/x", "a whole number"),
        ("signal_seconds", 1.5, "a whole number"),
        ("nodes", True, "a whole number"),
        ("exclusive", "yes", "true or false"),
        ("env", {"A;touch x": "1"}, "a variable name"),
        ("container_image", "img\ntouch /tmp/x", "line breaks"),
    ],
)
def test_bad_cluster_values_are_refused(key, value, message):
    from megatron_internvl.launch import slurm

    with pytest.raises(slurm.LaunchError, match=message):
        slurm.cluster_config({"gpus_per_node": 0, "tasks_per_node": 1, key: value})


@pytest.mark.parametrize(
    ("name", "run_dir"),
    [("demo$(touch x)", "/runs/demo"), ("a\nb", "/runs/a"), ("demo", "/runs/my demo")],
)
def test_names_and_paths_slurm_cannot_take_are_refused(name, run_dir):
    from megatron_internvl.launch import slurm

    cluster = slurm.cluster_config({"gpus_per_node": 0, "tasks_per_node": 1})
    with pytest.raises(slurm.LaunchError, match=r"letters, digits|#SBATCH line"):
        slurm.render(name, Path(run_dir), [], cluster, "layout")


LAUNCH = [sys.executable, "-m", "megatron_internvl.launch", "--dry-run"]


def test_job_script_runs_this_venv_with_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = subprocess.run(
        [*LAUNCH, "recipe=demo_cpu", "cluster=local_cpu", "output_dir=rel/out", "name=abs"],
        env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert script.returncode == 0, script.stderr[-2000:]
    out = tmp_path / "rel" / "out"
    assert f"#SBATCH --output={out}/abs/logs/slurm-%j.out" in script.stdout
    assert f"{sys.executable} -m megatron_internvl.launch.task" in script.stdout
    assert script.stdout.rstrip().endswith('exit "$rc"')
    assert f"output_dir={out}" in script.stdout and "output_dir=rel/out" not in script.stdout


# --- local rendezvous ----------------------------------------------------------------------

PROBE = """
import json, sys
import psutil, torch.distributed as dist
dist.init_process_group("gloo")
def listening(process):
    return sorted({c.laddr.ip for c in process.net_connections("inet") if c.status == "LISTEN"})
me = psutil.Process()
seen = {"launcher": listening(me.parent()), "rank": listening(me)}
dist.barrier()
with open(f"{sys.argv[1]}.{dist.get_rank()}", "w") as out:
    json.dump(seen, out)
dist.barrier()
dist.destroy_process_group()
"""


def _listening_addresses(tmp_path: Path, launcher: list[str]) -> list[dict]:
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if not k.endswith("SOCKET_IFNAME")}
    result = subprocess.run(
        [*launcher, "--standalone", "--nproc-per-node", "2", str(probe), str(tmp_path / "seen")],
        cwd=ROOT,
        env={**env, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads((tmp_path / f"seen.{rank}").read_text()) for rank in range(2)]


def test_local_rendezvous_listens_on_loopback_only(tmp_path):
    ours = _listening_addresses(tmp_path, [sys.executable, "-m", "megatron_internvl.launch.local"])
    assert ours[0]["launcher"], ours  # the store is there, on loopback
    for seen in ours:
        assert set(seen["launcher"]) | set(seen["rank"]) <= {"127.0.0.1"}, ours
    # The probe sees the difference: plain torchrun --standalone listens on every interface.
    plain = _listening_addresses(tmp_path, [sys.executable, "-m", "torch.distributed.run"])
    assert set(plain[0]["launcher"]) - {"127.0.0.1", "::1"}, plain


def test_multi_node_rendezvous_binds_where_the_cluster_file_says(tmp_path):
    from megatron_internvl.launch import slurm

    cluster = slurm.cluster_config({"gpus_per_node": 0, "tasks_per_node": 2, "interface": "lo"})
    script = slurm.render("job", tmp_path / "run", [], cluster, "layout")
    bin_dir = _recording_slurm(tmp_path)
    (bin_dir / "srun").write_text(
        '#!/bin/bash\necho "$MASTER_ADDR $GLOO_SOCKET_IFNAME $NCCL_SOCKET_IFNAME" > '
        f"{tmp_path}/env\n"
    )
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "7"}
    env["SLURM_JOB_NODELIST"] = "node1"
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "env").read_text().split() == ["127.0.0.1", "lo", "lo"]
    # The task's rank 0 store then listens on that address only (the probe of the local test).
    code = (
        "import os, psutil, torch.distributed as dist\n"
        "from megatron_internvl.launch.local import bind_stores\n"
        "bind_stores('127.0.0.1')\n"
        "dist.init_process_group('gloo', rank=0, world_size=1)\n"
        "print(sorted({c.laddr.ip for c in psutil.Process().net_connections('inet')"
        " if c.status == 'LISTEN'}))\n"
    )
    free = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "GLOO_SOCKET_IFNAME": "lo",
    }
    probe = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **free}, capture_output=True, text=True
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.strip() == "['127.0.0.1']", probe.stdout
