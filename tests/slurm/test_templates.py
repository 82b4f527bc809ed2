"""The SLURM templates (slurm/{sft,ppo,eval}.sbatch) and shell helpers: --help documents the knobs, the #SBATCH
lines come first, and every shell file parses. No cluster needed (test_sbatch.py submits real jobs)."""

from __future__ import annotations

import subprocess

import pytest

from helpers import REPO_ROOT

TEMPLATES = {stage: REPO_ROOT / f"slurm/{stage}.sbatch" for stage in ("sft", "ppo", "eval")}



@pytest.mark.parametrize("stage", sorted(TEMPLATES))
def test_template_help_documents_the_knobs(stage: str):
    path = TEMPLATES[stage]
    out = subprocess.run(["bash", str(path), "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    for knob in ("#SBATCH --nodes", "#SBATCH --gpus-per-node", "#SBATCH --time", "#SBATCH --signal",
                 "#SBATCH --requeue", "#SBATCH --output=%x-%j.out", "DETOX_CPU", "ACCELERATE_CONFIG", "MASTER_PORT"):
        assert knob in out.stdout, f"{path.name} --help does not mention {knob}"
    if stage != "sft":
        for knob in ("RESERVE_REWARD_GPU", "REWARD_SERVER", "HEALTH_TIMEOUT"):
            assert knob in out.stdout
    # The #SBATCH lines must precede the first command, or sbatch ignores them.
    lines = path.read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    no_args = subprocess.run(["bash", str(path)], capture_output=True, text=True, timeout=30)
    assert no_args.returncode == 2 and "--config" in no_args.stderr


def test_shell_files_parse():
    for path in [*TEMPLATES.values(), REPO_ROOT / "slurm/common.sh", REPO_ROOT / "slurm/task.sh",
                 REPO_ROOT / ".ci/slurm_cluster.sh"]:
        result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"{path}: {result.stderr}"
