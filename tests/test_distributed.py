"""DDP through RecBole's trainer on CPU (gloo): two processes, and the errors that must not hang."""

from __future__ import annotations

import socket

import pytest

from mamba4rec.distributed import DistSpec, check_spec, run_distributed
from tests.conftest import tiny_config_dict


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_train_and_rank0_reports_metrics(in_tmp):
    cfg = tiny_config_dict(in_tmp, scan_impl="torch")
    result = run_distributed("Mamba4Rec", "tiny", DistSpec(nproc=2, port=_free_port(), timeout_s=120),
                             config_dict=cfg)
    assert result["model"] == "Mamba4Rec" and result["epochs_run"] == 1
    assert set(result["test_result"]) == {"hit@10", "ndcg@10", "mrr@10"}
    assert all(0.0 <= v <= 1.0 for v in result["test_result"].values())
    # only rank 0 saved: one best checkpoint and one resumable -last file
    saved = sorted(p.name for p in (in_tmp / "saved").glob("*.pth"))
    assert len(saved) == 2 and saved[1] == "Mamba4Rec-tiny-last.pth", saved


def test_port_in_use_is_refused_before_starting():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(ValueError, match=f"--port={port}.*not available"):
            check_spec(DistSpec(nproc=2, port=port))


@pytest.mark.parametrize("spec,match", [
    (DistSpec(nproc=2, world_size=1), "world_size=1 is too small"),
    (DistSpec(nproc=0), "--nproc=0"),
    (DistSpec(nproc=1, group_offset=-1), "--group_offset=-1"),
    (DistSpec(nproc=1, backend="mpi"), "--backend='mpi'"),
    (DistSpec(nproc=1, port=70000), "--port=70000"),
])
def test_bad_settings_are_refused(spec, match):
    with pytest.raises(ValueError, match=match):
        check_spec(spec)


def test_world_size_larger_than_the_processes_times_out_with_a_clear_error(in_tmp):
    """world_size=3 but only 2 processes ever join: a bounded wait, then an error that says why."""
    import torch.multiprocessing as mp

    cfg = tiny_config_dict(in_tmp, scan_impl="torch")
    with pytest.raises(mp.ProcessRaisedException, match="could not form the process group"):
        run_distributed("Mamba4Rec", "tiny",
                        DistSpec(nproc=2, world_size=3, port=_free_port(), timeout_s=5), config_dict=cfg)


def test_cli_distributed_on_cpu(in_tmp):
    import subprocess
    import sys

    from tests.conftest import TINY_DATA
    from tests.test_pipeline import REPO

    proc = subprocess.run(
        [sys.executable, str(REPO / "run_recbole.py"), "--dataset=tiny", f"--data_path={TINY_DATA}", "--nproc=2",
         f"--port={_free_port()}", "--dist_timeout=120", "--epochs=1", "--train_batch_size=64",
         "--MAX_ITEM_LIST_LENGTH=10", "--hidden_size=16", "--d_state=4", "--show_progress=False",
         f"--checkpoint_dir={in_tmp / 'saved'}", "--load_col={'inter': ['user_id', 'item_id', 'timestamp']}"],
        cwd=in_tmp, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("test      : hit@10=") == 1  # printed once, by rank 0's launcher
    proc = subprocess.run([sys.executable, str(REPO / "run_recbole.py"), "--nproc=2", "--world_size=1"],
                          cwd=in_tmp, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "world_size=1 is too small" in proc.stderr


def test_two_nodes_without_a_shared_filesystem(tmp_path):
    """Two launchers, as on two machines: --nproc 1 each, --world_size 2, --group_offset 0 and 1,
    different working folders with a relative checkpoint_dir, so the second "node" cannot see
    rank 0's files. Rank 0's node saves and prints; the other node saves nothing and finishes."""
    import subprocess
    import sys

    from tests.conftest import TINY_DATA
    from tests.test_pipeline import REPO

    port = _free_port()
    common = ["--dataset=tiny", f"--data_path={TINY_DATA}", "--nproc=1", "--world_size=2", f"--port={port}",
              "--dist_timeout=120", "--epochs=2", "--train_batch_size=64", "--MAX_ITEM_LIST_LENGTH=10",
              "--hidden_size=16", "--d_state=4", "--show_progress=False", "--checkpoint_dir=saved",
              "--load_col={'inter': ['user_id', 'item_id', 'timestamp']}"]
    nodes = []
    for offset in (0, 1):
        cwd = tmp_path / f"node{offset}"
        cwd.mkdir()
        nodes.append((cwd, subprocess.Popen([sys.executable, str(REPO / "run_recbole.py"), *common,
                                             f"--group_offset={offset}"], cwd=cwd, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True)))
    outs = []
    for cwd, proc in nodes:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        outs.append(out)
    assert outs[0].count("test      : hit@10=") == 1 and "2 epochs" in outs[0]
    assert "test      :" not in outs[1] and "ranks 1..1 finished" in outs[1]
    assert len(list((tmp_path / "node0" / "saved").glob("*.pth"))) == 2  # best + -last, rank 0 only
    assert not list((tmp_path / "node1").glob("saved/*.pth"))


def test_two_cpu_processes_train_in_sequence_mode(in_tmp):
    """Each rank takes its share of every step's targets; same number of steps on both ranks."""
    cfg = tiny_config_dict(in_tmp, scan_impl="torch", train_mode="sequence", epochs=2)
    result = run_distributed("Mamba4Rec", "tiny", DistSpec(nproc=2, port=_free_port(), timeout_s=120),
                             config_dict=cfg)
    assert result["epochs_run"] == 2
    assert all(0.0 <= v <= 1.0 for v in result["test_result"].values())
