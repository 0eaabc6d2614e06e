"""Runs a check script in a subprocess with simulated CPU devices (`--xla_force_host_platform_device_count`), which
must be set before JAX starts, so not in the test process. The script prints one line `RESULT <json>`."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_check(script: str, devices: int = 8, timeout: int = 600) -> dict:
    """Runs `script` (a path) with `devices` CPU devices and the repository on PYTHONPATH; returns its RESULT
    json. Fails the test with the script's stderr tail when it exits non-zero."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.split("RESULT ", 1)[1])
