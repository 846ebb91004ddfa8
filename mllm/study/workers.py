"""One queue of the toy study's CPU jobs: `Workers` runs distillations and LLaVA runs in `workers` processes
(one torch thread each) while the calling process goes on with features and probes, so no core waits at a
phase boundary (a distillation's end, the features, the last run of a round).

    with Workers(budget.workers, budget.toy_profile) as pool:
        future = pool.submit(distill_students, ...)   # a concurrent.futures.Future
        ...                                            # this process works meanwhile
        result = future.result()

With `workers` <= 1 there are no processes: `submit` runs the job in this process at once and returns a
finished future (its exception, if any, is raised by `result()`).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from collections.abc import Callable


def worker_init(profile: str) -> None:
    """A worker process: one torch thread (the workers share the cores), the toy profile, quiet libraries."""
    import torch

    from mllm.study.common import quiet_libraries

    os.environ["UNITOWER_TOY_PROFILE"] = profile
    torch.set_num_threads(1)
    quiet_libraries()


class Workers:
    """A process pool of `workers` one-thread processes that takes jobs in the order they are submitted.

    Args:
        workers: processes; <= 1 runs every job in this process when it is submitted.
        profile: the toy build profile ($UNITOWER_TOY_PROFILE) of the workers.
    """

    def __init__(self, workers: int, profile: str) -> None:
        self._pool = None
        if workers > 1:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"), initializer=worker_init, initargs=(profile,))

    @property
    def parallel(self) -> bool:
        """True when jobs run in worker processes (this process is free meanwhile)."""
        return self._pool is not None

    def submit(self, function: Callable, *args) -> concurrent.futures.Future:
        """Queue `function(*args)` (run it now, here, without workers); returns its future."""
        if self._pool is not None:
            return self._pool.submit(function, *args)
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(function(*args))
        except Exception as error:  # noqa: BLE001 - handed to the caller through the future, as a pool would
            future.set_exception(error)
        return future

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if self._pool is not None:  # on an error, queued jobs are dropped instead of run
            self._pool.shutdown(wait=True, cancel_futures=kind is not None)
