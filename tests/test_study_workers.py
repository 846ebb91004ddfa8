"""mllm/study/workers.py: the toy study's one queue of worker processes (one torch thread each) and its
in-process fallback."""

import os

import pytest

from mllm.study.workers import Workers


def worker_state(tag: str) -> tuple:
    import torch

    return tag, os.getpid(), torch.get_num_threads(), os.environ.get("UNITOWER_TOY_PROFILE")


def fails(message: str) -> None:
    raise RuntimeError(message)


def test_without_workers_jobs_run_here_when_submitted():
    done = []
    with Workers(1, "smoke") as pool:
        assert not pool.parallel
        future = pool.submit(done.append, "first")
        assert future.done() and done == ["first"]  # ran at submit, before anything else
        assert pool.submit(worker_state, "a").result()[:2] == ("a", os.getpid())
        failed = pool.submit(fails, "bad input")
        with pytest.raises(RuntimeError, match="bad input"):
            failed.result()


def test_workers_are_other_processes_with_one_thread_and_the_profile():
    with Workers(2, "smoke") as pool:
        assert pool.parallel
        futures = [pool.submit(worker_state, str(i)) for i in range(4)]
        states = [f.result() for f in futures]
        with pytest.raises(RuntimeError, match="in a worker"):
            pool.submit(fails, "in a worker").result()
    assert [s[0] for s in states] == ["0", "1", "2", "3"]  # each future holds its own job's result
    pids = {s[1] for s in states}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert all(s[2] == 1 and s[3] == "smoke" for s in states)
