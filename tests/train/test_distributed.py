"""train/distributed.py: every collective of ours runs on the process's own device, and none bypasses `Collectives`.

On CPU, tests run with gloo, which accepts CPU tensors that NCCL would reject, so a test cannot catch a misplaced
tensor by running a collective. Instead: (1) `Collectives` is shown to move what it is given to its device (a
"meta" device here, which no caller's tensor is on), and (2) no other module of ours calls a tensor collective.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from train.distributed import Collectives
from helpers import REPO_ROOT

# Tensor collectives of torch.distributed and accelerate; object collectives (gather_object) pickle and place
# their own tensors.
TENSOR_COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "reduce", "reduce_scatter", "broadcast",
                      "gather", "scatter", "all_to_all", "gather_for_metrics", "pad_across_processes"}


class _Recorded(Exception):
    pass


def test_collectives_move_tensors_to_the_process_device(monkeypatch):
    seen = []

    def record(*args, **kwargs):
        tensor = args[1] if isinstance(args[0], list) else args[0]  # all_gather(parts, tensor) / all_reduce(tensor)
        seen.append(tensor.device)
        raise _Recorded

    monkeypatch.setattr(torch.distributed, "all_reduce", record)
    monkeypatch.setattr(torch.distributed, "all_gather", record)
    collectives = Collectives(rank=0, world_size=2, device=torch.device("meta"))
    for call in (collectives.all_reduce_sum, collectives.all_gather, collectives.gather_rows):
        with pytest.raises(_Recorded):
            call(torch.ones(3))  # a CPU tensor
    assert seen == [torch.device("meta")] * 3


def test_one_process_needs_no_process_group():
    collectives = Collectives()
    x = torch.arange(6.0).view(2, 3)
    assert collectives.all_reduce_sum(x) is x and collectives.all_gather(x) == [x] and collectives.gather_rows(x) is x


def _collective_calls(path: Path) -> list[str]:
    """Calls of tensor collectives in `path`: `torch.distributed.X(...)`, `accelerator.X(...)`, and bare names
    imported from torch.distributed or accelerate."""
    tree = ast.parse(path.read_text())
    imported = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and (node.module or "").startswith(("torch.distributed", "accelerate")) for alias in node.names
                if alias.name in TENSOR_COLLECTIVES}
    calls = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in TENSOR_COLLECTIVES:
            owner = ast.unparse(func.value)
            if owner.endswith(("distributed", "dist", "accelerator")) or owner.startswith("accelerator"):
                calls.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}: {ast.unparse(func)}")
        elif isinstance(func, ast.Name) and func.id in imported:
            calls.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}: {func.id}")
    return calls


def test_no_module_calls_a_tensor_collective_except_through_collectives():
    sources = [p for d in ("train", "rewards", "eval") for p in (REPO_ROOT / d).rglob("*.py")]
    assert len(sources) > 20
    offending = [c for p in sources if p.name != "distributed.py" or p.parent.name != "train" for c in _collective_calls(p)]
    assert offending == []
    assert len(_collective_calls(REPO_ROOT / "train" / "distributed.py")) >= 3  # the scan does see collectives


def test_the_scan_finds_collectives_called_by_a_bare_name(tmp_path):
    source = REPO_ROOT / "train" / "scan_probe.py"  # a path under the repository, as the scan reports them
    try:
        source.write_text("from accelerate.utils import gather as g\nfrom torch.distributed import all_reduce\n"
                          "def f(x):\n    all_reduce(x)\n    return g(x)\n")
        assert [c.split(": ")[1] for c in _collective_calls(source)] == ["all_reduce", "g"]
    finally:
        source.unlink()
