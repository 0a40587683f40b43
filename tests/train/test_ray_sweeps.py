"""Sweeps on Ray (``--backend ray``): a real cluster of two simulated nodes on this machine
(``ray.cluster_utils.Cluster``) trains a sweep exactly as the local pool does, a SIGKILLed Ray
worker's run is re-run by Ray and resumes bit for bit, a second invocation trains nothing, and
without Ray installed ``--backend ray`` is one line and exit 2.

The cluster is started once for the module, on loopback only, with a small object store and no
dashboard, and shut down (every Ray process with it) even when a test fails.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from bnlab.cli import main
from bnlab.train import SweepConfig, read_metrics, read_status, run_names, sweep
from bnlab.train.lock import lock_holder
from train.train_cases import assert_same_weights, final_weights, tiny_config, write_config

OBJECT_STORE_BYTES = 80 * 1024**2  # Ray's floor is 75 MiB
NODE = {
    "num_cpus": 1,
    "object_store_memory": OBJECT_STORE_BYTES,
    "node_ip_address": "127.0.0.1",
}


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    """A head and a worker node of one CPU each, this process connected as the driver."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_DISABLE_USAGE_STATS", "1")
        # Ray's single-machine mode: every address is 127.0.0.1 (read when ray is imported)
        patch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray = pytest.importorskip("ray")
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
        try:
            cluster.add_node(**NODE)
            cluster.wait_for_nodes(timeout=120)
            ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()


def _sweep_config(steps: int, grid: dict[str, list[Any]]) -> SweepConfig:
    return SweepConfig(tiny_config(**{"steps": steps, "checkpoint.every": 4}), grid)


def _assert_same_runs(ours: Path, reference: Path, names: list[str]) -> None:
    for name in names:
        assert read_metrics(ours / name) == read_metrics(reference / name), name
        assert (ours / name / "metrics.jsonl").read_bytes() == (
            reference / name / "metrics.jsonl"
        ).read_bytes(), name
        assert_same_weights(final_weights(ours / name), final_weights(reference / name))


@pytest.mark.slow
def test_a_sweep_on_a_two_node_cluster_equals_the_local_pool_and_reruns_nothing(
    ray_cluster: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bnlab.train.ray_backend import RayBackend

    config = _sweep_config(8, {"model.norm": ["none", "bn"], "seed": [0, 1]})
    local = sweep(config, tmp_path / "local", jobs=2, progress=False)
    capsys.readouterr()
    on_ray = sweep(config, tmp_path / "ray", backend=RayBackend(), progress=True)
    view = capsys.readouterr().err

    assert [(n, r.state, r.step) for n, r in on_ray.items()] == [
        (n, r.state, r.step) for n, r in local.items()
    ]
    assert {r.state for r in on_ray.values()} == {"finished"}
    _assert_same_runs(tmp_path / "ray", tmp_path / "local", list(local))
    nodes = set()
    for name in local:  # the view names every run, where it ran and how it ended
        assert f"{name}: finished at step 8" in view
        started = [line for line in view.splitlines() if line.startswith(f"{name}: started on")]
        assert len(started) == 1, view
        nodes.add(started[0].rsplit("(node ", 1)[1].split(",")[0])
    assert len(nodes) == 2, view  # both nodes of the cluster trained

    stamps = {n: os.stat(r.run_dir / "metrics.jsonl").st_mtime_ns for n, r in on_ray.items()}
    again = sweep(config, tmp_path / "ray", backend=RayBackend(), progress=False)
    assert {n: r.state for n, r in again.items()} == {n: "finished" for n in local}
    assert {n: os.stat(r.run_dir / "metrics.jsonl").st_mtime_ns for n, r in again.items()} == (
        stamps
    )


def _ray_worker_of(run_dir: Path) -> int:
    """The Ray worker whose task trains ``run_dir``: the lock holder is the trainer, its
    parent the fork server, whose parent is the worker."""
    holder = lock_holder(run_dir)
    assert holder is not None, f"{run_dir} is not being trained"
    pid = holder[1]
    for _ in range(2):
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert "ray::" in Path(f"/proc/{pid}/cmdline").read_text(), "not a Ray worker"
    return pid


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_ray_worker_is_rerun_and_resumes_bitwise_and_a_crash_fails_only_its_run(
    ray_cluster: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bnlab.train.ray_backend import RayBackend

    steps = 40
    missing = tmp_path / "no-such-folder"
    config = _sweep_config(steps, {"data.spec": ["digits", f"mnist:{missing}"]})
    crashing = next(name for name, _ in run_names(config) if name != "spec=digits")
    target = tmp_path / "ray" / "spec=digits"
    killed: list[int] = []

    def kill_mid_run() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            status = read_status(target)
            if status and status["state"] == "running" and 8 <= status["step"] < steps // 2:
                worker = _ray_worker_of(target)
                os.kill(worker, signal.SIGKILL)
                killed.append(worker)
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=kill_mid_run, daemon=True)
    watcher.start()
    results = sweep(config, tmp_path / "ray", backend=RayBackend(), progress=True)
    watcher.join(timeout=10)
    view = capsys.readouterr().err

    assert killed, "the run ended before the test could kill its worker"
    assert {n: r.state for n, r in results.items()} == {
        "spec=digits": "finished",
        crashing: "failed",
    }
    assert "not a folder" in (tmp_path / "ray" / crashing / "traceback.txt").read_text()
    assert f"{crashing}: failed at step 0" in view
    resumed_from = _env(target)["resumed_from"]
    assert 4 <= resumed_from < steps  # Ray's retry resumed from a checkpoint, not from scratch
    assert "retry 1 of spec=digits: started on" in view
    alone = SweepConfig(config.base, {"data.spec": ["digits"]})  # the killed run, uninterrupted
    reference = sweep(alone, tmp_path / "local", jobs=1, progress=False)
    assert [(n, r.state) for n, r in reference.items()] == [("spec=digits", "finished")]
    _assert_same_runs(tmp_path / "ray", tmp_path / "local", ["spec=digits"])


def _env(run_dir: Path) -> dict[str, Any]:
    import json

    env: dict[str, Any] = json.loads((run_dir / "env.json").read_text())
    return env


def test_backend_ray_without_ray_installed_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    config = write_config(tmp_path / "s.toml", tiny_config())
    with config.open("a") as handle:
        handle.write("[sweep.grid]\nseed = [0, 1]\n")
    runner = CliRunner()
    out = tmp_path / "out"
    for args in (
        ["sweep", str(config), "--out", str(out), "--backend", "ray"],
        ["reproduce", "--quick", "--out", str(out), "--backend", "ray"],
    ):
        result = runner.invoke(main, args)
        assert result.exit_code == 2, result.output
        assert result.stderr == (
            "error: --backend ray needs Ray, which is not installed: pip install 'bnlab[ray]'\n"
        )
        assert not out.exists()


def test_a_ray_option_without_backend_ray_is_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path / "s.toml", tiny_config())
    result = CliRunner().invoke(
        main, ["sweep", str(config), "--out", str(tmp_path / "out"), "--gpus-per-run", "1"]
    )
    assert result.exit_code == 2
    assert result.stderr == "error: --gpus-per-run needs --backend ray\n"
    assert not (tmp_path / "out").exists()


def test_an_address_where_no_cluster_answers_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ray = pytest.importorskip("ray")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as a fresh process would be
    config = write_config(tmp_path / "s.toml", tiny_config())
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        ["sweep", str(config), "--out", str(out), "--backend", "ray", "--address", "127.0.0.1:1"],
    )
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: --address 127.0.0.1:1: no Ray cluster answers there")
    assert result.stderr.count("\n") == 1
    assert not out.exists()


def test_a_node_that_does_not_share_the_run_store_fails_the_run_and_writes_nothing(
    tmp_path: Path,
) -> None:
    from bnlab.train.config import config_to_dict
    from bnlab.train.ray_backend import _Place, _run_task

    unshared = tmp_path / "not-mounted-here"
    place = _Place(str(tmp_path), str(unshared), {})
    result = _run_task("seed=0", config_to_dict(tiny_config()), place, 1, None, 0.0)
    assert (result.state, result.step) == ("failed", 0)
    assert result.reason.startswith(f"{unshared} does not exist on ")
    assert "every node mounts at the same path" in result.reason
    assert not unshared.exists()
