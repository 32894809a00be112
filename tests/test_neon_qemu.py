"""The NEON (aarch64) LUT kernel against the portable kernel, cross-built and run under
qemu-user by tests/native/run_neon_check.sh (no Python or ARM machine involved).

Only runs where `aarch64-linux-gnu-g++` and `qemu-aarch64` are on PATH (Debian:
`apt-get install g++-aarch64-linux-gnu qemu-user`). CI has neither, so CI skips this test:
there the NEON kernel is checked only by whoever runs the suite on a machine with the
cross toolchain, or by test_kernels.py on a real aarch64 machine.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "native" / "run_neon_check.sh"
TOOLS = ("aarch64-linux-gnu-g++", "qemu-aarch64")


@pytest.mark.slow
def test_neon_kernel_under_qemu(tmp_path):
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not on PATH (apt-get install g++-aarch64-linux-gnu qemu-user)")
    # the full sweep is about a minute of CPU under qemu; on shared cores allow much more
    env = dict(os.environ, BUILD_DIR=str(tmp_path))
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=1800)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.splitlines()[-1].startswith("OK:"), out[-4000:]
