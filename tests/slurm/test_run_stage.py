"""slurm/run_stage.py: a stage that exits with the preemption status (3) leaves the marker the template requeues on;
no other status does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO_ROOT

PY = sys.executable


@pytest.mark.parametrize("code, marked", [(3, True), (0, False), (1, False)])
def test_run_stage_marks_preemption_only(tmp_path: Path, code: int, marked: bool):
    (tmp_path / "fake_stage.py").write_text(
        "import sys\nif __name__ == '__main__':\n    print(' '.join(sys.argv[1:]))\n"
        f"    raise SystemExit({code})\n"
    )
    marker = tmp_path / "out" / ".slurm" / "42.preempted"
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "DETOX_PREEMPTED_MARKER": str(marker)}
    out = subprocess.run([PY, "slurm/run_stage.py", "fake_stage", "--config", "x.yaml"], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == code and out.stdout.strip() == "--config x.yaml"
    assert marker.exists() == marked
