"""The parameter report (train/param_report.py): the lines the original notebook printed, shared and 4-bit
parameters, and its command line (`python -m train.param_report`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from train.config import LoraSettings
from train.errors import ModelError
from train.models import Seq2SeqPolicy, ValueHead, apply_lora, build_from_architecture
from train.param_report import ParamReport, parameter_report
from helpers import CHECKPOINT_PARAMS

# What the original notebook printed for flan-t5-base with LoRA r=32 on q, v.
NOTEBOOK_LORA_LINES = (
    "trainable model parameters: 3538944\n"
    "all model parameters: 251116800\n"
    "percentage of trainable model parameters: 1.41%"
)


def test_original_notebook_lines_for_base_with_lora_and_value_head():
    lora = LoraSettings(r=32, alpha=32, target_modules=["q", "v"])
    peft_model = apply_lora(build_from_architecture("google/flan-t5-base"), lora)
    assert parameter_report(peft_model).format() == NOTEBOOK_LORA_LINES

    policy = Seq2SeqPolicy(peft_model, ValueHead(768, dropout=0.1))
    report = parameter_report(policy)
    head = 768 + 1  # Linear(768 -> 1) weight and bias
    assert (report.trainable, report.total) == (3538944 + head, 251116800 + head)
    assert report.format().splitlines()[-1] == "percentage of trainable model parameters: 1.41%"
    assert report.percent == pytest.approx(100 * report.trainable / report.total)


def test_param_report_cli_prints_the_notebook_lines(capsys, repo_root):
    from train import param_report

    param_report.main(["--model.name_or_path", "google/flan-t5-base", "--lora.r", "32", "--lora.target_modules", "q,v"])
    assert capsys.readouterr().out.strip() == NOTEBOOK_LORA_LINES
    param_report.main([])  # the defaults are the original notebook's
    assert capsys.readouterr().out.strip() == NOTEBOOK_LORA_LINES
    param_report.main(["--lora.r", "16"])  # half the rank, half the LoRA parameters
    assert capsys.readouterr().out.splitlines()[0] == f"trainable model parameters: {3538944 // 2}"
    param_report.main(["--config", str(repo_root / "configs/flan_t5_base.yaml"), "--value-head"])
    assert capsys.readouterr().out.splitlines()[:2] == [
        f"trainable model parameters: {3538944 + 769}",
        f"all model parameters: {251116800 + 769}",
    ]
    param_report.main(["--all", "--no-lora"])
    table = capsys.readouterr().out
    for hub_id, total in CHECKPOINT_PARAMS.items():
        assert hub_id in table and f"{total:,}" in table


def test_unknown_architecture_is_a_model_error(capsys):
    with pytest.raises(ModelError, match="google/flan-t5-base"):
        build_from_architecture("t5-nonexistent")
    from train import param_report
    from train.cli import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(param_report.main, ["--model.name_or_path", "t5-nonexistent"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no architecture for 't5-nonexistent'") and "Traceback" not in err


@pytest.mark.parametrize(("argv", "message"), [
    (["--r", "16"], "error: --r was replaced: use --lora.r"),
    (["--model", "google/flan-t5-xl"], "error: --model was replaced: use --model.name_or_path"),
    (["--targets", "q,k"], "error: --targets was replaced: use --lora.target_modules"),
    (["--lora.rank", "8"], "error: unknown option --lora.rank; valid keys in lora: r, alpha, target_modules, dropout, bias"),
    (["--all", "--model.name_or_path", "google/flan-t5-xl"],
     "error: --all reports every shipped FLAN-T5 size: drop --model.name_or_path, or drop --all"),
])
def test_param_report_former_flags_fail_naming_the_key(capsys, argv, message):
    from train import param_report
    from train.cli import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(param_report.main, argv)
    assert exit_info.value.code == 2 and capsys.readouterr().err.strip() == message


def test_parameter_report_counts_shared_parameters_once_and_4bit_twice():
    shared = nn.Linear(4, 4, bias=False)
    model = nn.Sequential(shared, shared)
    assert parameter_report(model).total == 16

    class Params4bit(nn.Parameter):  # stands in for bitsandbytes' packed 4-bit parameter (uint8 storage)
        pass

    packed = nn.Module()
    packed.weight = Params4bit(torch.zeros(8, dtype=torch.uint8), requires_grad=False)
    assert parameter_report(packed) == ParamReport(trainable=0, total=16)
