"""Model factory (train/models.py): shipped FLAN-T5 architectures, LoRA and parameter counts, the policy with its value
head, the adapter-off KL reference, saving/loading, and one clear ModelError for each kind of bad input. The parameter
report and its command line are tested in test_param_report.py."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import train.models as models
from train.config import ExperimentConfig, LoraSettings, ModelConfig
from train.errors import ModelError
from train.models import (
    Seq2SeqPolicy,
    ValueHead,
    add_reference_adapter,
    apply_lora,
    build_from_architecture,
    load_base_model,
    load_policy,
    load_tokenizer,
    load_value_head,
    save_policy,
    torch_dtype,
)
from train.param_report import parameter_report
from helpers import CHECKPOINT_PARAMS

# d_model, d_ff, num_heads, num_layers of each size (FLAN-T5 / T5 v1.1 model cards).
SIZES = {
    "google/flan-t5-small": (512, 1024, 6, 8),
    "google/flan-t5-base": (768, 2048, 12, 12),
    "google/flan-t5-large": (1024, 2816, 16, 24),
    "google/flan-t5-xl": (2048, 5120, 32, 24),
    "google/flan-t5-xxl": (4096, 10240, 64, 24),
}


# ----------------------------------------------------------------------------------------------------
# Shipped architectures and parameter counts (meta device: no memory, even for xxl)


@pytest.mark.parametrize("hub_id", list(CHECKPOINT_PARAMS))
def test_shipped_architecture_matches_the_checkpoint(hub_id, repo_root):
    config_dir = repo_root / "configs/architectures" / hub_id.split("/")[1]
    assert models.resolve_architecture(hub_id) == config_dir
    raw = json.loads((config_dir / "config.json").read_text())
    d_model, d_ff, heads, layers = SIZES[hub_id]
    assert (raw["d_model"], raw["d_ff"], raw["num_heads"], raw["num_layers"], raw["num_decoder_layers"]) == (
        d_model, d_ff, heads, layers, layers
    )
    assert (raw["d_kv"], raw["vocab_size"], raw["feed_forward_proj"], raw["tie_word_embeddings"]) == (
        64, 32128, "gated-gelu", False
    )
    assert raw["task_specific_params"]["summarization"]["prefix"] == "summarize: "

    model = build_from_architecture(hub_id)
    assert model.lm_head.weight is not model.shared.weight  # FLAN-T5 has its own LM head
    assert model.lm_head.weight.device.type == "meta"
    assert parameter_report(model).total == CHECKPOINT_PARAMS[hub_id]


def test_untied_head_accounts_for_the_difference_to_a_tied_t5():
    """The published base count is the tied T5 count plus one vocab x d_model LM head."""
    model = build_from_architecture("google/flan-t5-base")
    tied_total = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("lm_head"))
    assert parameter_report(model).total == tied_total + 32128 * 768


def _lora_params_by_formula(config, lora: LoraSettings) -> int:
    """Each targeted attention projection gains A (r x in) and B (out x r); q, v map d_model <-> heads*d_kv."""
    attention_blocks = config.num_layers + 2 * config.num_decoder_layers  # encoder self; decoder self + cross
    inner = config.num_heads * config.d_kv
    return len(lora.target_modules) * attention_blocks * lora.r * (config.d_model + inner)


@pytest.mark.parametrize("hub_id", ["google/flan-t5-small", "google/flan-t5-base", "google/flan-t5-xxl"])
def test_lora_counts_follow_the_formula(hub_id):
    lora = LoraSettings(r=32, alpha=32, target_modules=["q", "v"])
    base = build_from_architecture(hub_id)
    base_total = parameter_report(base).total
    report = parameter_report(apply_lora(base, lora))
    expected = _lora_params_by_formula(base.config, lora)
    assert report.trainable == expected
    assert report.total == base_total + expected
    if hub_id != "google/flan-t5-small":  # d_model == heads * d_kv here: the textbook 2*r*d_model per module
        n_modules = 2 * (base.config.num_layers + 2 * base.config.num_decoder_layers)
        assert expected == 2 * lora.r * base.config.d_model * n_modules


# ----------------------------------------------------------------------------------------------------
# Loading, the policy and the KL reference (tiny T5)


@pytest.fixture(scope="module")
def t5_dir(tiny_artifacts) -> Path:
    return Path(tiny_artifacts.t5)


def _cfg(t5_dir: Path, **model_overrides) -> ExperimentConfig:
    cfg = ExperimentConfig()
    cfg.model = ModelConfig(name_or_path=str(t5_dir), **{"dtype": "float32", **model_overrides})
    cfg.lora = LoraSettings(r=4, alpha=8, target_modules=["q", "v"], dropout=0.0)
    return cfg


def _batch(vocab_size: int, batch: int = 2, src: int = 7, tgt: int = 5):
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, vocab_size, (batch, src), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -2:] = 0  # a padded prompt
    decoder_input_ids = torch.randint(2, vocab_size, (batch, tgt), generator=g)
    decoder_input_ids[:, 0] = 0  # decoder_start_token_id
    return dict(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids)


def _lora_state(policy: Seq2SeqPolicy) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in policy.peft_model.named_parameters() if "lora_" in n}


def test_tokenizer_and_model_load_from_a_local_directory(t5_dir):
    cfg = _cfg(t5_dir)
    tokenizer = load_tokenizer(cfg.model)
    model = load_base_model(cfg.model)
    assert 100 < len(tokenizer) <= model.config.vocab_size  # a real vocabulary, not a 4-token fallback
    assert model.lm_head.weight is not model.shared.weight
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # The offline report of a local directory builds the same architecture from its config.
    assert parameter_report(build_from_architecture(str(t5_dir))).total == parameter_report(model).total


def test_bfloat16_dtype_loads_and_values_stay_float32(t5_dir):
    assert torch_dtype("bfloat16") is torch.bfloat16
    cfg = _cfg(t5_dir, dtype="bfloat16")
    base = load_base_model(cfg.model)
    assert {p.dtype for p in base.parameters()} == {torch.bfloat16}
    policy, _ = load_policy(cfg)
    policy.eval()
    logits, values = policy(**_batch(policy.config.vocab_size))
    assert values.dtype == torch.float32 and policy.value_head.summary.weight.dtype == torch.float32


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_untied_head_warning_is_filtered_and_other_warnings_are_not(t5_dir):
    """transformers warns "... both are present ... NOT tie them" for every untied T5: expected, so hidden."""
    logger = logging.getLogger("transformers.modeling_utils")
    records = _Records()
    logger.addHandler(records)  # sees what passes the logger's filters
    try:
        model = load_base_model(_cfg(t5_dir).model)
    finally:
        logger.removeHandler(records)
    assert model.lm_head.weight is not model.shared.weight  # the situation that triggers the warning
    assert not [m for m in records.messages if "NOT tie" in m]

    other = logging.LogRecord(logger.name, logging.WARNING, __file__, 1, "Some weights were not used", None, None)
    assert logger.filter(other)


def test_untied_head_survives_save_and_load(tmp_path):
    """A local model directory: built from its config with its own head, saved, loaded, still untied."""
    from transformers import T5Config

    T5Config(vocab_size=40, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
             feed_forward_proj="gated-gelu", tie_word_embeddings=False).save_pretrained(tmp_path / "config")
    model = build_from_architecture(str(tmp_path / "config"), device="cpu")
    assert model.lm_head.weight is not model.shared.weight
    assert not torch.equal(model.lm_head.weight, model.shared.weight)  # equal tensors would be re-tied on load
    model.save_pretrained(tmp_path / "model")
    loaded = load_base_model(ModelConfig(name_or_path=str(tmp_path / "model"), dtype="float32"))
    assert loaded.lm_head.weight is not loaded.shared.weight
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)
    assert parameter_report(loaded).total == parameter_report(model).total


def test_value_head_maps_hidden_states_to_one_value_per_token():
    head = ValueHead(16, dropout=0.1)
    assert isinstance(head.dropout, nn.Dropout) and head.dropout.p == 0.1
    assert (head.summary.in_features, head.summary.out_features) == (16, 1)
    hidden = torch.randn(3, 5, 16, dtype=torch.bfloat16)
    values = head(hidden)
    assert values.shape == (3, 5) and values.dtype == torch.float32


def test_policy_forward_and_adapter_off_kl_reference(t5_dir):
    cfg = _cfg(t5_dir)
    torch.manual_seed(0)
    base_alone = load_base_model(cfg.model).eval()
    batch = _batch(base_alone.config.vocab_size)
    with torch.no_grad():
        base_logits = base_alone(**batch).logits

    policy, _ = load_policy(cfg)
    policy.eval()  # no dropout: logits must be comparable
    logits, values = policy(**batch)
    B, T = batch["decoder_input_ids"].shape
    assert logits.shape == (B, T, policy.config.vocab_size)
    assert values.shape == (B, T)
    # A fresh LoRA starts with B = 0: the policy is exactly the base model.
    torch.testing.assert_close(logits, base_logits)
    torch.testing.assert_close(policy.reference_logits(**batch), base_logits)

    with torch.no_grad():
        for name, p in policy.peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    perturbed, _ = policy(**batch)
    assert not torch.allclose(perturbed, base_logits, atol=1e-4)
    torch.testing.assert_close(policy.reference_logits(**batch), base_logits)  # adapter off = the base
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    with policy.adapter_disabled():
        torch.testing.assert_close(policy(**batch)[0], base_logits)
        assert [n for n, p in policy.named_parameters() if p.requires_grad] == trainable  # what DDP watches
        with policy.peft_model.disable_adapter():  # peft's own switch agrees
            torch.testing.assert_close(policy(**batch)[0], base_logits)
    torch.testing.assert_close(policy(**batch)[0], perturbed)  # adapter back on after the context
    with pytest.raises(RuntimeError, match="inside"), policy.adapter_disabled():
        raise RuntimeError("inside")
    torch.testing.assert_close(policy(**batch)[0], perturbed)  # and after an error in it

    out = policy.generate(**{k: batch[k] for k in ("input_ids", "attention_mask")}, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == B and out.shape[1] <= 4


def test_initial_adapter_reference_stays_frozen_while_the_policy_trains(t5_dir, tmp_path):
    """ppo.reference: initial_adapter: the reference is the adapter PPO started from, not the base, and stays it."""
    torch.manual_seed(0)
    policy, _ = load_policy(_cfg(t5_dir))
    with torch.no_grad():
        for name, p in policy.peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    sft_dir = save_policy(policy, tmp_path / "sft")

    policy, _ = load_policy(_cfg(t5_dir, adapter=str(sft_dir)))
    trainable_before = [n for n, p in policy.named_parameters() if p.requires_grad]
    add_reference_adapter(policy, str(sft_dir))
    assert [n for n, p in policy.named_parameters() if p.requires_grad] == trainable_before
    assert policy.peft_model.active_adapter == "default"
    reference_params = [p for n, p in policy.named_parameters() if f".{models.REFERENCE_ADAPTER}." in n]
    assert reference_params and not any(p.requires_grad for p in reference_params)

    policy.eval()
    batch = _batch(policy.config.vocab_size)
    with torch.no_grad():
        start_logits = policy(**batch)[0]
        reference = policy.reference_logits(**batch)
        with policy.adapter_disabled():
            base_logits = policy(**batch)[0]
    torch.testing.assert_close(reference, start_logits)  # the reference is the starting policy...
    assert not torch.allclose(reference, base_logits, atol=1e-3)  # ...not the base

    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        policy(**batch)[0].logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        trained_logits = policy(**batch)[0]
        assert not torch.allclose(trained_logits, start_logits, atol=1e-3)
        torch.testing.assert_close(policy.reference_logits(**batch), reference, rtol=0, atol=0)

    # Only the trained adapter is saved, and it is the trained one.
    out_dir = save_policy(policy, tmp_path / "trained")
    assert not (out_dir / models.REFERENCE_ADAPTER).exists()
    reloaded, _ = load_policy(_cfg(t5_dir, adapter=str(out_dir)))
    assert _lora_state(reloaded).keys() == {n for n in _lora_state(policy) if f".{models.REFERENCE_ADAPTER}." not in n}
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch)[0], trained_logits)

    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="adapter_config.json"):
        add_reference_adapter(reloaded, str(tmp_path / "empty"))


def test_save_and_load_policy_round_trip(t5_dir, tmp_path):
    cfg = _cfg(t5_dir)
    policy, tokenizer = load_policy(cfg)
    with torch.no_grad():
        for name, p in policy.peft_model.named_parameters():
            if "lora_" in name:
                p.normal_()
        policy.value_head.summary.weight.normal_()
    out_dir = save_policy(policy, tmp_path / "policy", tokenizer=tokenizer)
    files = {p.name for p in out_dir.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "value_head.safetensors"} <= files
    assert not any(f.endswith((".bin", ".pt")) for f in files)

    reloaded, _ = load_policy(_cfg(t5_dir, adapter=str(out_dir)))
    before, after = _lora_state(policy), _lora_state(reloaded)
    assert before.keys() == after.keys() and before
    for name in before:
        torch.testing.assert_close(after[name], before[name])
    assert all(p.requires_grad for n, p in reloaded.peft_model.named_parameters() if "lora_" in n)
    for name, tensor in policy.value_head.state_dict().items():
        torch.testing.assert_close(reloaded.value_head.state_dict()[name], tensor)

    frozen, _ = load_policy(_cfg(t5_dir, adapter=str(out_dir)), trainable=False)
    assert parameter_report(frozen).trainable == 0

    fresh_head = load_value_head(ValueHead(policy.config.d_model), out_dir)
    torch.testing.assert_close(fresh_head.summary.weight, policy.value_head.summary.weight)


# ----------------------------------------------------------------------------------------------------
# Bad input: one ModelError each


def test_missing_or_incomplete_adapter_directory_is_a_model_error(t5_dir, tmp_path):
    base = load_base_model(_cfg(t5_dir).model)
    with pytest.raises(ModelError, match="not found"):
        apply_lora(base, LoraSettings(), adapter=str(tmp_path / "no" / "such" / "adapter"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="adapter_config.json"):
        apply_lora(base, LoraSettings(), adapter=str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="value_head.safetensors"):
        load_value_head(ValueHead(8), tmp_path / "empty")


def test_unknown_lora_target_lists_the_available_modules(t5_dir):
    base = load_base_model(_cfg(t5_dir).model)
    linear_names = {name.rsplit(".", 1)[-1] for name, m in base.named_modules() if isinstance(m, nn.Linear)}
    assert {"q", "k", "v", "o", "lm_head"} <= linear_names
    with pytest.raises(ModelError) as err:
        apply_lora(base, dataclasses.replace(LoraSettings(), target_modules=["q", "nonexistent"]))
    message = str(err.value)
    assert "'nonexistent'" in message
    assert all(name in message for name in linear_names)


def test_quantization_without_cuda_says_what_is_needed(t5_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for bits in ("4bit", "8bit"):
        with pytest.raises(ModelError) as err:
            load_base_model(_cfg(t5_dir, quantization=bits).model)
        assert str(err.value) == (
            f"quantization '{bits}' needs a CUDA GPU and bitsandbytes: pip install -e '.[bitsandbytes]'"
        )


def test_missing_model_path_and_offline_hub_id(tmp_path, monkeypatch):
    missing = str(tmp_path / "no-such-model")
    for load in (load_base_model, load_tokenizer):
        with pytest.raises(ModelError, match="no-such-model"):
            load(ModelConfig(name_or_path=missing, dtype="float32"))
    # A hub id that is not cached: offline mode makes the failure immediate instead of network retries.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="someone/not-a-model.*local directory"):
        load_base_model(ModelConfig(name_or_path="someone/not-a-model", dtype="float32"))


def test_unknown_dtype_is_a_model_error():
    with pytest.raises(ModelError, match="bfloat16"):
        torch_dtype("float64")


# ----------------------------------------------------------------------------------------------------
# Damaged adapters, adapters of another base, and hub ids on a machine without the hub


@pytest.fixture(scope="module")
def saved_policy(t5_dir, tmp_path_factory) -> Path:
    policy, _ = load_policy(_cfg(t5_dir))
    return save_policy(policy, tmp_path_factory.mktemp("policy") / "adapter")


def _copy_damaged(src: Path, dst: Path, file: str, content: bytes | None) -> Path:
    """A copy of the adapter `src` with `file` truncated to 200 bytes (content None) or replaced by `content`."""
    import shutil

    shutil.copytree(src, dst)
    data = (dst / file).read_bytes()
    (dst / file).write_bytes(data[:200] if content is None else content)
    return dst


@pytest.mark.parametrize("content", [None, b"", b"not a safetensors file"], ids=["truncated", "empty", "garbage"])
def test_damaged_adapter_weights_are_one_line_naming_the_file(t5_dir, saved_policy, tmp_path, content):
    damaged = _copy_damaged(saved_policy, tmp_path / "adapter", "adapter_model.safetensors", content)
    weights = str(damaged / "adapter_model.safetensors")
    for load in (lambda: load_policy(_cfg(t5_dir, adapter=str(damaged))),
                 lambda: add_reference_adapter(load_policy(_cfg(t5_dir))[0], str(damaged))):
        with pytest.raises(ModelError) as err:
            load()
        message = str(err.value)
        assert message.startswith(f"{weights} is not a valid safetensors file (truncated or damaged?)")
        assert "\n" not in message


def test_damaged_value_head_is_one_line_naming_the_file(t5_dir, saved_policy, tmp_path):
    damaged = _copy_damaged(saved_policy, tmp_path / "adapter", "value_head.safetensors", None)
    with pytest.raises(ModelError) as err:
        load_policy(_cfg(t5_dir, adapter=str(damaged)))
    message = str(err.value)
    assert message.startswith(f"{damaged / 'value_head.safetensors'} is not a valid safetensors file")
    assert "\n" not in message


@pytest.fixture(scope="module")
def foreign_adapter(t5_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(a base like the tiny T5 but with d_model 32 instead of 64, a LoRA adapter saved from it)."""
    from transformers import T5Config, T5ForConditionalGeneration

    root = tmp_path_factory.mktemp("foreign")
    config = T5Config.from_pretrained(t5_dir)
    assert config.d_model == 64
    config.d_model = 32
    T5ForConditionalGeneration(config).save_pretrained(root / "base-d32")
    base = load_base_model(ModelConfig(name_or_path=str(root / "base-d32"), dtype="float32"))
    lora = LoraSettings(r=4, alpha=8, target_modules=["q", "v"], dropout=0.0)
    apply_lora(base, lora).save_pretrained(root / "adapter")
    return root / "base-d32", root / "adapter"


def test_adapter_of_another_base_names_both_bases_and_the_first_shape(t5_dir, foreign_adapter):
    foreign_base, adapter = foreign_adapter
    expected = (
        f"adapter {str(adapter)!r} was trained on another base model ({str(foreign_base)!r} in its "
        f"adapter_config.json) and does not fit {str(t5_dir)!r}: "
        "base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.default.weight is [4, 32] in the adapter "
        "but [4, 64] in the model (12 mismatched tensor(s))."
    )
    with pytest.raises(ModelError) as err:
        load_policy(_cfg(t5_dir, adapter=str(adapter)))
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)
    with pytest.raises(ModelError) as err:
        add_reference_adapter(load_policy(_cfg(t5_dir))[0], str(adapter))
    assert str(err.value).startswith("reference " + expected.replace(".lora_A.default.", ".lora_A.reference."))


def test_uncached_hub_id_without_a_hub_fails_at_once_in_one_line(t5_dir, unreachable_hub, caplog):
    expected = (
        "{} 'someone/not-cached' is neither a local directory nor in the Hugging Face cache ({}), and the hub "
        "cannot be reached (http://127.0.0.1:9: [Errno 111] Connection refused). On a machine with internet run "
        "`hf download someone/not-cached --local-dir DIR`, copy DIR here and {}"
    )
    model_cfg = ModelConfig(name_or_path="someone/not-cached", dtype="float32")
    start = time.monotonic()
    for what, load in (("tokenizer", lambda: load_tokenizer(model_cfg)), ("model", lambda: load_base_model(model_cfg))):
        with pytest.raises(ModelError) as err:
            load()
        assert str(err.value) == expected.format(what, unreachable_hub.hub_cache, "pass it with --model.name_or_path DIR")
    base = load_base_model(_cfg(t5_dir).model)
    with pytest.raises(ModelError) as err:
        apply_lora(base, LoraSettings(), adapter="someone/not-cached")
    assert str(err.value) == expected.format("adapter", unreachable_hub.hub_cache, "set model.adapter to DIR")
    assert time.monotonic() - start < 10  # the libraries' own retries take about a minute
    assert not [r for r in caplog.records if r.name.startswith("huggingface_hub")]


def test_cached_hub_id_without_a_hub_loads_from_the_cache_without_requests(t5_dir, unreachable_hub, caplog):
    import shutil

    repo = unreachable_hub.hub_cache / "models--someone--tiny-t5"
    shutil.copytree(t5_dir, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    model_cfg = ModelConfig(name_or_path="someone/tiny-t5", dtype="float32")
    start = time.monotonic()
    tokenizer, model = load_tokenizer(model_cfg), load_base_model(model_cfg)
    assert time.monotonic() - start < 10
    assert 100 < len(tokenizer) <= model.config.vocab_size and model.config.d_model == 64
    assert not [r for r in caplog.records if r.name.startswith("huggingface_hub")]
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # offline only while loading


def test_hub_id_without_a_hub_is_one_line_from_the_command_line(repo_root, tmp_path):
    """The whole command, as a user runs it without network: one error line, not a minute of retry warnings."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE"):
        env.pop(key, None)
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "train.merge_adapter", "--config", "configs/tiny.yaml", "--model.name_or_path",
         "google/flan-t5-base", "--model.adapter", "someone/adapter", "--out", str(tmp_path / "merged")],
        cwd=repo_root, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"error: tokenizer 'google/flan-t5-base' is neither a local directory nor in the Hugging Face cache "
        f"({tmp_path / 'hf' / 'hub'}), and the hub cannot be reached (http://127.0.0.1:9: [Errno 111] Connection "
        "refused). On a machine with internet run `hf download google/flan-t5-base --local-dir DIR`, copy DIR here "
        "and pass it with --model.name_or_path DIR"
    ]
    assert time.monotonic() - start < 60
