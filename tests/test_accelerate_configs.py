"""Every accelerate config parses with accelerate's own loader and agrees with the recipes' batch settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

from train.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "accelerate_configs"
RECIPES = sorted((REPO / "configs").glob("*.yaml"))
GPU_RECIPES = [r for r in RECIPES if r.name != "tiny.yaml"]

# The shipped configs, by what they are for (the CPU one belongs to the SFT tests).
EXPECTED = {
    "single_gpu.yaml": ("NO", None),
    "multi_gpu.yaml": ("MULTI_GPU", None),
    "deepspeed_zero2.yaml": ("DEEPSPEED", 2),
    "deepspeed_zero3_bf16.yaml": ("DEEPSPEED", 3),
    "deepspeed_zero3_offload.yaml": ("DEEPSPEED", 3),
    "multi_node_zero3.yaml": ("DEEPSPEED", 3),
    "cpu_2proc.yaml": ("MULTI_CPU_OR_GPU", None),
}
DTYPE_OF_PRECISION = {"bf16": "bfloat16", "fp16": "float16", "no": "float32"}


def all_configs() -> list[Path]:
    return sorted(CONFIG_DIR.glob("*.yaml"))


def test_every_expected_config_exists():
    names = {p.name for p in all_configs()}
    missing = sorted(set(EXPECTED) - names)
    assert not missing, f"missing accelerate configs: {missing}"
    assert len(GPU_RECIPES) >= 1 and (REPO / "configs" / "tiny.yaml") in RECIPES


@pytest.mark.parametrize("path", all_configs(), ids=lambda p: p.name)
def test_config_parses_with_accelerate(path: Path):
    cfg = load_config_from_file(str(path))
    assert isinstance(cfg, ClusterConfig)
    kind, stage = EXPECTED.get(path.name, (None, None))
    if kind == "MULTI_CPU_OR_GPU":  # the CPU config: several processes on this machine, no GPU
        assert cfg.use_cpu or cfg.distributed_type.value in ("MULTI_CPU", "MULTI_GPU")
        assert cfg.num_processes >= 2 and cfg.num_machines == 1
        tiny = load_config(REPO / "configs" / "tiny.yaml")
        assert DTYPE_OF_PRECISION[cfg.mixed_precision] == tiny.model.dtype  # float32 on the CPU
        return
    assert cfg.distributed_type.value == kind
    assert cfg.num_processes >= 1 and cfg.num_machines >= 1
    # num_processes is the total over all machines: each machine runs the same number.
    assert cfg.num_processes % cfg.num_machines == 0
    if stage is not None:
        ds = cfg.deepspeed_config
        assert ds["zero_stage"] == stage
        offload = path.name == "deepspeed_zero3_offload.yaml"
        assert (ds["offload_optimizer_device"] == "cpu") == offload
        assert (ds["offload_param_device"] == "cpu") == offload
        if cfg.num_machines > 1:
            # srun starts one launcher per machine; pdsh/ssh from the first machine would bypass SLURM.
            assert ds["deepspeed_multinode_launcher"] == "standard"
    if path.name == "multi_node_zero3.yaml":
        assert cfg.num_machines >= 2 and cfg.main_process_port


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
@pytest.mark.parametrize("path", all_configs(), ids=lambda p: p.name)
def test_batch_settings_agree_with_recipes(path: Path, recipe: Path):
    raw = yaml.safe_load(path.read_text())
    exp = load_config(recipe)
    num_processes = int(raw["num_processes"])
    # PPO's batch sizes are global: each process takes batch_size / num_processes rows and mini-batches of
    # mini_batch_size / num_processes, so both must divide evenly or train.ppo stops after loading the model.
    assert exp.ppo.batch_size % num_processes == 0, (path.name, recipe.name, exp.ppo.batch_size, num_processes)
    assert exp.ppo.mini_batch_size % num_processes == 0, (path.name, recipe.name, exp.ppo.mini_batch_size)
    # accelerate exports a config's gradient_accumulation_steps to the script, where it silently replaces the
    # recipe's value: a config must leave it out ("auto") or agree with every stage of every recipe.
    ds = raw.get("deepspeed_config") or {}
    for key, recipe_values in (
        ("gradient_accumulation_steps", {exp.sft.gradient_accumulation_steps, exp.ppo.gradient_accumulation_steps}),
        ("gradient_clipping", {exp.sft.max_grad_norm, exp.ppo.max_grad_norm}),
    ):
        if key in ds and ds[key] != "auto":
            assert recipe_values == {ds[key]}, f"{path.name}: {key}={ds[key]} overrides {recipe.name}'s {recipe_values}"
    assert "gradient_accumulation_steps" not in raw or raw["gradient_accumulation_steps"] in (
        "auto", exp.sft.gradient_accumulation_steps
    )


@pytest.mark.parametrize("recipe", GPU_RECIPES, ids=lambda p: p.name)
@pytest.mark.parametrize("path", [p for p in all_configs() if p.name != "cpu_2proc.yaml"], ids=lambda p: p.name)
def test_mixed_precision_matches_recipe_dtype(path: Path, recipe: Path):
    """The GPU configs compute in the precision the GPU recipes load the model in."""
    raw = yaml.safe_load(path.read_text())
    assert DTYPE_OF_PRECISION[raw["mixed_precision"]] == load_config(recipe).model.dtype
