"""Project layout rules: imports flow eval -> train/rewards and train -> rewards, never back."""

import ast
from pathlib import Path

import pytest

FORBIDDEN = {"rewards": {"train", "eval"}, "train": {"eval"}, "eval": set()}


def imported_top_level_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_flow_one_way(repo_root, package):
    files = sorted((repo_root / package).rglob("*.py"))
    assert files, f"package {package}/ has no modules"
    offenders = {
        str(f.relative_to(repo_root)): sorted(imported_top_level_packages(f) & FORBIDDEN[package]) for f in files
    }
    assert {f: bad for f, bad in offenders.items() if bad} == {}


def test_no_weights_or_dialogsum_files_are_tracked(repo_root):
    import subprocess

    tracked = subprocess.run(["git", "ls-files"], cwd=repo_root, capture_output=True, text=True, check=True).stdout.split()
    bad = [f for f in tracked if f.endswith((".safetensors", ".bin", ".pt")) or "dialogsum." in Path(f).name]
    assert bad == []
