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


@pytest.fixture(autouse=True)
def _one_thread_per_rank(monkeypatch):
    """Every rank (and launcher) these tests start gets one intra-op thread: two ranks of two
    threads on two cores only wait on each other's barriers."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


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
    """world_size=3 but only 2 processes ever join: a bounded wait (1 s: nothing can join later
    anyway), then an error that says why."""
    import torch.multiprocessing as mp

    cfg = tiny_config_dict(in_tmp, scan_impl="torch")
    with pytest.raises(mp.ProcessRaisedException, match="could not form the process group"):
        run_distributed("Mamba4Rec", "tiny",
                        DistSpec(nproc=2, world_size=3, port=_free_port(), timeout_s=1), config_dict=cfg)


@pytest.mark.parametrize("mode", ["sequence", "history"])
def test_cli_distributed_on_cpu_two_ranks_train_and_rank0_reports_metrics(in_tmp, capfd, monkeypatch, mode):
    """run_recbole.py --nproc=2 with this process as the launcher: the two ranks are processes of
    their own (their output is captured too, capfd). In train_mode=sequence or history (whose
    evaluation runs each rank's users from their whole histories), two epochs: each rank
    takes its share of every step's targets, with the same number of steps on both ranks (else
    an epoch would hang on the gradient all-reduce). One launch checks both: they share its
    launch path, and each launch costs two processes importing torch and RecBole."""
    import run_recbole

    from mamba4rec import distributed
    from tests.conftest import TINY_DATA

    results, real = [], distributed.run_distributed
    monkeypatch.setattr(distributed, "run_distributed", lambda *a, **k: results.append(real(*a, **k)) or results[-1])
    code = run_recbole.main(
        ["--dataset=tiny", f"--data_path={TINY_DATA}", "--nproc=2",
         f"--port={_free_port()}", "--dist_timeout=120", "--epochs=2", f"--train_mode={mode}",
         "--train_batch_size=64",
         "--MAX_ITEM_LIST_LENGTH=10", "--hidden_size=16", "--d_state=4", "--show_progress=False",
         f"--checkpoint_dir={in_tmp / 'saved'}", "--load_col={'inter': ['user_id', 'item_id', 'timestamp']}"])
    out, err = capfd.readouterr()
    assert code == 0, err[-3000:]
    assert out.count("test      : hit@10=") == 1  # printed once, by rank 0's launcher
    (result,) = results
    assert result["model"] == "Mamba4Rec" and result["epochs_run"] == 2
    assert set(result["test_result"]) == {"hit@10", "ndcg@10", "mrr@10"}
    assert all(0.0 <= v <= 1.0 for v in result["test_result"].values())
    # only rank 0 saved: one best checkpoint and one resumable -last file
    saved = sorted(p.name for p in (in_tmp / "saved").glob("*.pth"))
    assert len(saved) == 2 and saved[1] == "Mamba4Rec-tiny-last.pth", saved

    assert run_recbole.main(["--nproc=2", "--world_size=1"]) == 2
    assert "world_size=1 is too small" in capfd.readouterr().err


def test_two_nodes_without_a_shared_filesystem(tmp_path, capfd, monkeypatch):
    """Two launchers, as on two machines: --nproc 1 each, --world_size 2, --group_offset 0 and 1,
    different working folders with a relative checkpoint_dir, so the second "node" cannot see
    rank 0's files. Rank 0's node saves and prints; the other node saves nothing and finishes.
    Node 1's launcher is a process of its own; node 0's is this process (run_recbole.main, in
    node0/), which spares one launcher's import of torch and RecBole."""
    import subprocess
    import sys

    import run_recbole

    from tests.conftest import TINY_DATA
    from tests.test_pipeline import REPO

    port = _free_port()
    common = ["--dataset=tiny", f"--data_path={TINY_DATA}", "--nproc=1", "--world_size=2", f"--port={port}",
              "--dist_timeout=120", "--epochs=2", "--train_batch_size=64", "--MAX_ITEM_LIST_LENGTH=10",
              "--hidden_size=16", "--d_state=4", "--show_progress=False", "--checkpoint_dir=saved",
              "--load_col={'inter': ['user_id', 'item_id', 'timestamp']}"]
    for offset in (0, 1):
        (tmp_path / f"node{offset}").mkdir()
    node1 = subprocess.Popen([sys.executable, str(REPO / "run_recbole.py"), *common, "--group_offset=1"],
                             cwd=tmp_path / "node1", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        monkeypatch.chdir(tmp_path / "node0")
        code = run_recbole.main([*common, "--group_offset=0"])
        out0, err0 = capfd.readouterr()
        assert code == 0, err0[-3000:]
        out1, err1 = node1.communicate(timeout=300)
        assert node1.returncode == 0, err1[-3000:]
    finally:
        if node1.poll() is None:
            node1.kill()
            node1.communicate()
    outs = [out0, out1]
    assert outs[0].count("test      : hit@10=") == 1 and "2 epochs" in outs[0]
    assert "test      :" not in outs[1] and "ranks 1..1 finished" in outs[1]
    assert len(list((tmp_path / "node0" / "saved").glob("*.pth"))) == 2  # best + -last, rank 0 only
    assert not list((tmp_path / "node1").glob("saved/*.pth"))
