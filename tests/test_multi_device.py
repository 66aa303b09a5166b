"""Runs tests/multi_device/ in a fresh interpreter with 8 fake CPU devices (XLA reads
XLA_FLAGS once, when JAX starts, so it cannot happen in this process)."""
import os
import re
import subprocess
import sys

from tests.conftest import REPO


def test_sharded_runs_on_eight_devices_match_one_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "tests/multi_device"],
        cwd=REPO, env=env, capture_output=True, text=True,
    )
    report = result.stdout + result.stderr
    print("\n".join(line for line in report.splitlines() if re.search(r"error|bytes|losses|passed|failed", line)))
    assert result.returncode == 0, report[-5000:]
    # The last line may be a progress bar the sample CLI test drew on stderr.
    summary = [line for line in report.splitlines() if re.search(r"\b(passed|failed)\b", line)][-1]
    assert re.search(r"\b6 passed\b", summary) and "skipped" not in summary, summary
