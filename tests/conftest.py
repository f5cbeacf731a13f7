"""Test-wide environment: no network, no W&B, a headless matplotlib backend."""

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

# One torch thread per test process (as mechgrok's own training and analyses use), so the pytest-xdist
# workers of `make test` do not oversubscribe the cores; an explicit OMP_NUM_THREADS (e.g. the
# portability check's two-thread row) is left as it is.
if "OMP_NUM_THREADS" not in os.environ:
    import torch

    torch.set_num_threads(1)


def _seconds(item) -> float:
    """The time a test marked ``@pytest.mark.slow(seconds=N)`` takes (10 when the mark gives none)."""
    return item.get_closest_marker("slow").kwargs.get("seconds", 10)


def pytest_collection_modifyitems(config, items):
    """Spread the slow tests (``@pytest.mark.slow(seconds=...)``) over the pytest-xdist workers.

    ``--dist worksteal`` first hands each of its ``k`` workers a contiguous share of the collection
    and later moves tests from the tail of the longest queue to an idle worker. Left in file order,
    the long tests (demo workers, Ray, notebooks) bunch up in one share and the run ends with one
    worker busy; here they are assigned greedily (longest first, to the least loaded share) to the
    heads of the shares, so that every worker starts with its long tests and the quick ones are the
    ones moved around. The order is a pure function of the collection, the same in every worker.
    """
    k = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    slow = sorted((it for it in items if it.get_closest_marker("slow")), key=lambda it: -_seconds(it))  # stable
    if k < 2 or not slow:
        return
    fast = [it for it in items if not it.get_closest_marker("slow")]
    sizes, left = [], len(items)
    for r in range(k, 0, -1):  # the share sizes worksteal's first distribution uses
        sizes.append(left // r)
        left -= sizes[-1]
    shares: list[list] = [[] for _ in range(k)]
    load = [0.0] * k
    for it in slow:
        j = min((j for j in range(k) if len(shares[j]) < sizes[j]), key=lambda j: (load[j], j))
        shares[j].append(it)
        load[j] += _seconds(it)
    for j in range(k):
        take = sizes[j] - len(shares[j])
        shares[j] += fast[:take]
        fast = fast[take:]
    items[:] = [it for share in shares for it in share]
