"""A process that built a run destroys the process group before interpreter exit.

gloo torn down during interpreter shutdown once aborted a rank after training had finished
("terminate called without an active exception"); lmkit registers an exit hook for API users
(the CLI also destroys the group when it returns).
"""
from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

from lmkit_test_utils import REPO, TINY


def test_process_group_is_destroyed_before_exit(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = textwrap.dedent(f"""
        import atexit, os
        import torch.distributed as dist
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="{port}", RANK="0", WORLD_SIZE="1")
        # registered first, so it runs after lmkit's hook (atexit is last-in, first-out)
        atexit.register(lambda: print("initialized at exit:", dist.is_initialized(), flush=True))
        from lmkit.api import build
        build({TINY!r}, {str(tmp_path / "run")!r})
        dist.init_process_group("gloo")
        print("initialized after build:", dist.is_initialized(), flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "initialized after build: True" in out.stdout
    assert "initialized at exit: False" in out.stdout
