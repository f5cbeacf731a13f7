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
