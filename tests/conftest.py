"""Suite-wide settings: one torch thread.

Small models gain nothing from intra-op threads, results then do not depend on the thread count
(the distributed tests compare processes with the parent bit for bit), and subprocesses inherit
the setting through OMP_NUM_THREADS.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

import torch  # noqa: E402

torch.set_num_threads(1)
