"""The memory planner: its byte counts against what the real code allocates, its activation model against the
tensors autograd really keeps, sharding/quantisation monotonicity, verdicts, knobs and the command line."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import subprocess
import sys

import pytest
import torch

from train.config import ExperimentConfig, LoraSettings, load_config
from train.errors import ConfigError
from train.models import (
    ValueHead, add_reference_adapter, apply_lora, build_from_architecture, load_policy, resolve_architecture,
    save_policy,
)
from train.plan import (
    GIB, DEFAULT_REWARD_MODEL, Arch, PlanInputs, activation_bytes, count_parameters, gradient_bytes, main,
    markdown_table, optimizer_bytes, plan_for, reward_model_params, suggest_knob, trainable_bytes, weight_bytes,
)
from train.ppo_core import logprobs_from_logits


@pytest.fixture(scope="module")
def small_base():
    """flan-t5-small with random weights from the shipped config (fp32, ~300 MB), built once."""
    return build_from_architecture("google/flan-t5-small", device="cpu")


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _actual_bytes(policy) -> tuple[int, int, int]:
    """(frozen weight bytes, trainable bytes, Adam state bytes after one step) of a real policy."""
    params = list(policy.parameters())  # deduplicated, as the model holds them
    trainable = [p for p in params if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-3)
    for p in trainable:
        p.grad = torch.ones_like(p)
    optimizer.step()
    states = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    assert len(optimizer.state) == len(trainable)
    return _tensor_bytes(p for p in params if not p.requires_grad), _tensor_bytes(trainable), _tensor_bytes(states)


def _check_planner_matches(policy, model_name: str, lora: LoraSettings, dtype: str) -> None:
    frozen, trainable, states = _actual_bytes(policy)
    counts, _ = count_parameters(model_name, lora)
    assert weight_bytes(counts, dtype, None) == frozen
    assert trainable_bytes(counts) == trainable
    assert optimizer_bytes(counts) == states


def test_bytes_match_real_tiny_policy(tiny_artifacts, repo_root):
    cfg = load_config(repo_root / "configs" / "tiny.yaml", ["--model.name_or_path", str(tiny_artifacts.t5)])
    policy, _ = load_policy(cfg)
    _check_planner_matches(policy, str(tiny_artifacts.t5), cfg.lora, cfg.model.dtype)


def test_bytes_match_real_critic_free_tiny_policy(tiny_artifacts, repo_root):
    """rloo builds its policy without a value head (as train.ppo does): the plan's trainable and Adam bytes are that
    policy's."""
    cfg = load_config(repo_root / "configs" / "tiny.yaml", ["--model.name_or_path", str(tiny_artifacts.t5),
                                                            "--ppo.advantage_estimator", "rloo",
                                                            "--rollout.samples_per_prompt", "2"])
    policy, _ = load_policy(cfg, with_value_head=False)
    assert policy.value_head is None
    _, trainable, states = _actual_bytes(policy)
    counts = plan_for(PlanInputs.from_config(cfg)).counts
    assert trainable_bytes(counts) == trainable and optimizer_bytes(counts) == states


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bytes_match_real_flan_t5_small(dtype, small_base):
    lora = LoraSettings()  # the original notebook's r=32 on q, v
    base = copy.deepcopy(small_base).to(getattr(torch, dtype))
    policy = torch.nn.ModuleDict({"model": apply_lora(base, lora), "value_head": ValueHead(base.config.d_model)})
    assert all(p.dtype == torch.float32 for p in policy.parameters() if p.requires_grad)  # LoRA stays fp32
    _check_planner_matches(policy, "google/flan-t5-small", lora, dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_activation_model_matches_saved_tensors(dtype, small_base):
    """The formula against the bytes autograd really keeps for one PPO-style forward of flan-t5-small, on a batch
    padded as rollouts are (prompts and responses of several lengths)."""
    torch.manual_seed(0)
    lora = LoraSettings()
    base = copy.deepcopy(small_base).to(getattr(torch, dtype))
    model = apply_lora(base, lora)
    head = ValueHead(base.config.d_model)
    model.eval()
    batch, prompt_len, decoder_len = 2, 400, 17  # long prompts: the (length x length) masks matter
    ids = torch.randint(2, 1000, (batch, prompt_len))
    dec = torch.randint(2, 1000, (batch, decoder_len))
    mask, dec_mask = torch.ones_like(ids), torch.ones_like(dec)
    mask[1, 250:], dec_mask[0, 12:] = 0, 0
    params = {p.untyped_storage().data_ptr() for p in list(model.parameters()) + list(head.parameters())}
    kept: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask,
                    output_hidden_states=True, use_cache=False)
        values = head(out.decoder_hidden_states[-1])
        logprobs = logprobs_from_logits(out.logits[:, :-1].float(), dec[:, 1:])
    del logprobs, values  # autograd keeps its tensors at forward time: no backward needed to measure them
    measured = sum(kept.values())
    predicted = activation_bytes(Arch.from_config(base.config), batch, prompt_len, decoder_len, dtype, lora.target_modules)
    assert abs(predicted - measured) / measured < 0.03, (predicted, measured)
    # Gradient checkpointing keeps far less (only block inputs plus one block).
    checkpointed = activation_bytes(Arch.from_config(base.config), batch, prompt_len, decoder_len, dtype,
                                    lora.target_modules, gradient_checkpointing=True)
    assert checkpointed < predicted / 2


def test_critic_free_activations_lose_exactly_the_value_head_input(small_base):
    """Without a value head (rloo, group) the forward asks for no hidden states and keeps no fp32 copy of the last
    one: autograd's saved bytes drop by what the planner's value-head term says, 4 bytes * d_model per decoder token."""
    lora = LoraSettings()
    base = copy.deepcopy(small_base).to(torch.bfloat16)
    model = apply_lora(base, lora)
    head = ValueHead(base.config.d_model)
    model.eval(), head.eval()  # as ppo_core runs the policy (dropout off)
    batch, prompt_len, decoder_len = 2, 40, 17
    ids = torch.randint(2, 1000, (batch, prompt_len))
    dec = torch.randint(2, 1000, (batch, decoder_len))
    params = {p.untyped_storage().data_ptr() for p in list(model.parameters()) + list(head.parameters())}

    def saved_bytes(value_head: bool) -> int:
        kept: dict[int, int] = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec,
                        output_hidden_states=value_head, use_cache=False)
            values = head(out.decoder_hidden_states[-1]) if value_head else None
            logprobs = logprobs_from_logits(out.logits[:, :-1].float(), dec[:, 1:])
        del logprobs, values
        return sum(kept.values())

    arch = Arch.from_config(base.config)
    with_head, without = (activation_bytes(arch, batch, prompt_len, decoder_len, "bfloat16", lora.target_modules,
                                           value_head=v) for v in (True, False))
    assert with_head - without == batch * decoder_len * 4 * 512  # flan-t5-small: d_model 512
    assert saved_bytes(True) - saved_bytes(False) == with_head - without


def test_reward_model_params_match_roberta_base_formula():
    h, inter, layers, vocab, positions = 768, 3072, 12, 50265, 514
    embeddings = (vocab + positions + 1) * h + 2 * h  # word + position + token type, LayerNorm
    layer = 4 * (h * h + h) + 2 * h + (h * inter + inter) + (inter * h + h) + 2 * h
    head = (h * h + h) + (h * 2 + 2)  # RobertaClassificationHead: dense + out_proj
    params, hidden, intermediate = reward_model_params(DEFAULT_REWARD_MODEL)
    assert params == embeddings + layers * layer + head
    assert (hidden, intermediate) == (h, inter)


def _inputs(**kw) -> PlanInputs:
    """The original notebook's inputs (the config defaults), changed by `kw`."""
    return dataclasses.replace(PlanInputs.from_config(ExperimentConfig()), **kw)


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")  # tiny.yaml adapts lm_head
def test_reference_adapter_bytes_match_a_real_second_adapter(tiny_artifacts, repo_root, tmp_path):
    """ppo.reference: initial_adapter adds a frozen copy of the LoRA and nothing else; the planner counts exactly that."""
    cfg = load_config(repo_root / "configs" / "tiny.yaml", ["--model.name_or_path", str(tiny_artifacts.t5)])
    start = save_policy(load_policy(cfg)[0], tmp_path / "start")
    cfg.model.adapter, cfg.ppo.reference = str(start), "initial_adapter"
    policy, _ = load_policy(cfg)
    frozen_without, trainable, _ = _actual_bytes(policy)
    add_reference_adapter(policy, str(start))
    frozen_with, trainable_after, _ = _actual_bytes(policy)
    assert trainable_after == trainable

    cfg.plan.gpus, cfg.plan.zero, cfg.plan.gpu_mem_gib = 2, 3, 1.0
    inputs = PlanInputs.from_config(cfg)
    assert inputs.reference_adapter
    with_ref = plan_for(dataclasses.replace(inputs, zero=2)).components
    assert with_ref["KL reference adapter (frozen LoRA)"] == frozen_with - frozen_without > 0
    sharded = plan_for(inputs).components["KL reference adapter (frozen LoRA)"]
    assert sharded == -(-(frozen_with - frozen_without) // 2)  # ZeRO-3 shards it over the 2 GPUs
    assert "KL reference adapter (frozen LoRA)" not in plan_for(dataclasses.replace(inputs, reference_adapter=False)).components


@pytest.mark.parametrize("estimator", ["rloo", "group"])
def test_critic_free_plans_have_no_value_head(estimator, capsys):
    """rloo and group build no value head: the plan drops exactly its share, worked out by hand for flan-t5-small
    (d_model 512: ValueHead is Linear(512, 1), 513 parameters in 2 tensors), and says so."""
    same = dict(model="google/flan-t5-small", samples_per_prompt=4)  # one k for both: only the value head differs
    gae, free = plan_for(_inputs(**same)), plan_for(_inputs(estimator=estimator, **same))
    head = 512 + 1
    assert (gae.counts.value_head, free.counts.value_head) == (head, 0)
    assert gae.counts.trainable - free.counts.trainable == head
    assert trainable_bytes(gae.counts) - trainable_bytes(free.counts) == 4 * head
    assert optimizer_bytes(gae.counts) - optimizer_bytes(free.counts) == 8 * head + 4 * 2  # + a step per tensor
    assert gradient_bytes(gae.counts) - gradient_bytes(free.counts) == 4 * head
    # 1 GPU, no ZeRO (the defaults): the components are these byte counts unsharded.
    assert gae.components["trainable (LoRA + value head)"] - free.components["trainable (LoRA)"] == 4 * head
    assert gae.components["optimizer (Adam)"] - free.components["optimizer (Adam)"] == 8 * head + 4 * 2
    # Training phase: the gradients, and the value head's fp32 input for the mini-batch's 4 rows x 401 decoder
    # tokens (400 new + the start token). Generation does not depend on the estimator.
    assert gae.phases["training"] - free.phases["training"] == 4 * head + 4 * 401 * 4 * 512
    assert gae.phases["generation"] == free.phases["generation"]

    main(["--model.name_or_path", "google/flan-t5-small", "--ppo.advantage_estimator", estimator,
          "--rollout.samples_per_prompt", "4"])
    out = capsys.readouterr().out
    assert "value head)" not in out.splitlines()[0] and "trainable (LoRA) " in out
    assert f"estimator {estimator} (critic-free: no value head), 4 summaries per prompt: PPO batch 16 rows (4 prompts x 4)" in out


@pytest.mark.parametrize("gen_batch, rows_per_call", [(16, 8), (1, 4)])
def test_generation_phase_with_k_samples_per_prompt(gen_batch, rows_per_call):
    """k = 4 summaries per prompt, ppo.batch_size 16 rows over 2 GPUs: 8 rows per GPU = 2 prompts x 4. A generate()
    call takes min(rollout.batch_size, 2) prompts and samples 4 rows for each; the rollout keeps the policy's and the
    adapter-off reference's encoder outputs of the 2 prompts (each encoder runs once per prompt). flan-t5-small by hand: d_model 512, inner 6 heads x 64 = 384,
    8 decoder layers, vocabulary 32128; bf16 (2 bytes), prompt 512 tokens, 400 new tokens."""
    p = plan_for(_inputs(model="google/flan-t5-small", estimator="rloo", samples_per_prompt=4, gpus=2, zero=2,
                         gen_batch=gen_batch))
    g = rows_per_call
    self_cache = 2 * 8 * g * 384 * 400 * 2
    cross_cache = 2 * 8 * g * 384 * 512 * 2
    expanded_encoder = g * 512 * 512 * 2  # each prompt's encoder output repeated 4 times for the call
    step_logits = g * 32128 * 4 * 3
    kept_encoder = (2 + 2) * 512 * 512 * 2  # policy's and reference's, per prompt
    assert p.phases["generation"] == self_cache + cross_cache + expanded_encoder + step_logits + kept_encoder
    # k = 1 with the same batch: 8 prompts per GPU, min(gen_batch, 8) rows per call, the policy's encoder output kept
    # (the reference runs its own encoder per row, as often as it would per prompt).
    one = plan_for(_inputs(model="google/flan-t5-small", gpus=2, zero=2, gen_batch=gen_batch))
    g1 = min(gen_batch, 8)
    assert one.phases["generation"] == (2 * 8 * g1 * 384 * (400 + 512) * 2 + g1 * 512 * 512 * 2 + g1 * 32128 * 4 * 3
                                        + 8 * 512 * 512 * 2)


def test_more_gpus_under_zero3_means_less_per_gpu():
    peaks = [plan_for(_inputs(model="google/flan-t5-large", gpus=n, zero=3, batch=16, mini_batch=8)) for n in (1, 2, 8)]
    weights = [p.components["weights (frozen base)"] for p in peaks]
    assert weights[0] > weights[1] > weights[2]
    assert peaks[0].peak > peaks[1].peak > peaks[2].peak
    # ZeRO-2 keeps a full copy of the frozen weights on every GPU, ZeRO-3 shards them.
    zero2 = plan_for(_inputs(model="google/flan-t5-large", gpus=8, zero=2, batch=16, mini_batch=8))
    assert zero2.components["weights (frozen base)"] == weights[0]
    assert zero2.components["optimizer (Adam)"] < plan_for(_inputs(model="google/flan-t5-large")).components["optimizer (Adam)"]


def test_quantised_weights_are_smaller():
    counts, _ = count_parameters("google/flan-t5-xl", LoraSettings())
    sizes = [weight_bytes(counts, "bfloat16", q) for q in ("4bit", "8bit", None)]
    assert sizes[0] < sizes[1] < sizes[2] < weight_bytes(counts, "float32", None)
    # 4bit: about a quarter of bf16 for the quantised Linears, but never less than the fp32 parts kept unquantised.
    assert sizes[0] > 4 * (counts.keep_fp32 + counts.other)


def _t5_parameters_from_config(model: str) -> int:
    """FLAN-T5 parameter count by hand from config.json (gated-GELU, untied LM head)."""
    c = json.loads((resolve_architecture(model) / "config.json").read_text())
    d, ff, inner, heads = c["d_model"], c["d_ff"], c["num_heads"] * c["d_kv"], c["num_heads"]
    attention = 4 * d * inner
    encoder = c["num_layers"] * (attention + 3 * d * ff + 2 * d)
    decoder = c["num_decoder_layers"] * (2 * attention + 3 * d * ff + 3 * d)
    relative_bias = 2 * c["relative_attention_num_buckets"] * heads  # first encoder and decoder layers
    return 2 * c["vocab_size"] * d + encoder + decoder + relative_bias + 2 * d  # + final norms


def test_xxl_verdicts_follow_from_the_sizes():
    notebook = _inputs(model="google/flan-t5-xxl", dtype="float32")  # the notebook's PPO batch 16 / mini-batch 4
    single = plan_for(notebook)
    fp32_weights = 4 * _t5_parameters_from_config("google/flan-t5-xxl")  # the frozen weights alone
    assert single.counts.base == fp32_weights // 4
    assert single.peak > fp32_weights > 0.5 * single.limit
    assert not single.fits
    assert plan_for(dataclasses.replace(notebook, quant="4bit")).fits
    assert plan_for(dataclasses.replace(notebook, gpus=8, zero=3, mini_batch=8)).fits
    name, after = suggest_knob(single)
    assert after.fits and after.peak < single.peak and name.startswith("--")
    assert plan_for(_inputs(model="google/flan-t5-small")).fits


def test_cli_plan_config_and_table(capsys, tiny_artifacts, repo_root, tmp_path):
    p = main(["--model.name_or_path", "google/flan-t5-small", "--plan.gpus", "2", "--plan.zero", "3",
              "--ppo.mini_batch_size", "4"])
    out = capsys.readouterr().out
    assert "verdict: FITS" in out and "ZeRO-3 gathered layer" in out and (p.inputs.gpus, p.inputs.zero) == (2, 3)
    p = main(["--config", str(repo_root / "configs" / "tiny.yaml"), "--plan.gpu_mem_gib", "1.0", "--plan.margin=0",
              "--model.name_or_path", str(tiny_artifacts.t5), "--reward.model_name_or_path", str(tiny_artifacts.roberta)])
    out = capsys.readouterr().out
    assert p.inputs.prompt_len == 256 and p.inputs.max_new_tokens == 32 and p.inputs.margin == 0
    assert not p.fits and "DOES NOT FIT" in out  # 1 GiB of CUDA overhead alone leaves too little
    assert "turn this knob: --" in out
    # The plan section can live in a recipe like any other section; the command line still wins.
    recipe = tmp_path / "plan.yaml"
    recipe.write_text("model:\n  name_or_path: google/flan-t5-small\n  quantization: 4bit\n"
                      "plan:\n  gpus: 4\n  zero: 2\n  offload: true\n  gpu_mem_gib: 40\n")
    p = main(["--config", str(recipe), "--plan.gpus", "8", "--ppo.mini_batch_size", "8"])
    capsys.readouterr()
    assert (p.inputs.gpus, p.inputs.zero, p.inputs.offload, p.inputs.gpu_mem_gib, p.inputs.quant) == (8, 2, True, 40.0, "4bit")
    assert (p.inputs.mini_batch, p.inputs.batch) == (8, 16)
    table = markdown_table(_inputs(), models=["google/flan-t5-small"])
    rows = [line for line in table.splitlines() if line.startswith("| google/")]
    assert len(rows) == 4 and table.splitlines()[0].startswith("| model | GPUs | ZeRO |")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--plan.zero", "5"], "plan.zero must be"),
        (["--plan.zero", "1", "--plan.offload", "true"], "plan.offload needs"),
        (["--model.name_or_path", "google/flan-t5-huge"], "no architecture"),
        (["--plan.gpus", "0"], "plan.gpus must be"),
        (["--plan.margin", "1"], "plan.margin must be"),
        (["--plan.gpus", "two"], "'plan.gpus' must be an integer"),
        (["--plan.reward_device", "elsewhere"], "'plan.reward_device' must be one of"),
        (["--reward.model_name_or_path", "someone/other-classifier"], "cannot size reward model"),
        # The former flags fail naming the key that replaced them.
        (["--gpus", "8"], "--gpus was replaced: use --plan.gpus"),
        (["--model", "google/flan-t5-xxl"], "--model was replaced: use --model.name_or_path"),
        (["--mini-batch", "8"], "--mini-batch was replaced: use --ppo.mini_batch_size"),
        (["--gradient-checkpointing"], "--gradient-checkpointing was replaced: use --plan.gradient_checkpointing true"),
        (["--gpu-mem", "40"], "--gpu-mem was replaced: use --plan.gpu_mem_gib"),
        # --table sweeps these itself: setting one is refused, not ignored.
        (["--table", "--plan.gpus", "4"], "--table sweeps the model, plan.gpus and plan.zero itself: drop --plan.gpus"),
        (["--table", "--model.name_or_path=google/flan-t5-xxl"], "drop --model.name_or_path"),
    ],
)
def test_bad_input_gives_one_clear_error(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        main(argv)


@pytest.mark.parametrize("change, message", [
    ({"gpus": 0}, "plan.gpus must be at least 1, got 0"),
    ({"zero": 4}, "plan.zero must be one of 0, 1, 2, 3, got 4"),
    ({"gpu_mem_gib": float("nan")}, "plan.gpu_mem_gib must be positive and finite, got nan"),
    ({"margin": 1.0}, "plan.margin must be in [0, 1), got 1.0"),
])
def test_inputs_built_in_code_are_held_to_the_config_ranges(change, message):
    """The config checks the plan section when it loads; inputs made or changed in code (the knobs, --table) go
    through PlanInputs.check, with the same ranges (BOUNDS)."""
    with pytest.raises(ConfigError) as error:
        _inputs(**change).check()
    assert str(error.value) == message


@pytest.mark.parametrize("change, message", [
    ({"estimator": "rloo", "samples_per_prompt": 1}, "ppo.advantage_estimator rloo compares the summaries of a prompt "
     "with each other: set rollout.samples_per_prompt to 2 or more (it is 1)"),
    ({"estimator": "group", "samples_per_prompt": 0}, "rollout.samples_per_prompt must be at least 1, got 0"),
    ({"samples_per_prompt": 0}, "rollout.samples_per_prompt must be at least 1, got 0"),
    ({"estimator": "ppo"}, "ppo.advantage_estimator must be one of gae, rloo, group, got 'ppo'"),
], ids=["rloo k=1", "group k=0", "gae k=0", "unknown estimator"])
def test_estimator_inputs_built_in_code_give_one_clear_error(change, message):
    """The config refuses these when it loads; PlanInputs made or changed in code name the keys the same way."""
    with pytest.raises(ConfigError) as error:
        plan_for(_inputs(**change))
    assert str(error.value) == message


def test_cli_error_is_one_line_and_help_shows_the_grammar(repo_root):
    done = subprocess.run([sys.executable, "-m", "train.plan", "--zero", "3"], cwd=repo_root, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == "error: --zero was replaced: use --plan.zero"
    help_text = subprocess.run([sys.executable, "-m", "train.plan", "--help"], cwd=repo_root, capture_output=True,
                               text=True, timeout=120).stdout
    assert "--section.key VALUE" in help_text and "--plan.gpus" in help_text and "--table" in help_text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: compares with torch.cuda.max_memory_allocated")
def test_planner_against_cuda_allocations():
    """flan-t5-base-sized random weights in bf16: weights/optimizer exact, one training pass within 25%."""
    device = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    lora = LoraSettings()
    base = build_from_architecture("google/flan-t5-base", device=device).to(torch.bfloat16)
    policy = torch.nn.ModuleDict({"model": apply_lora(base, lora), "value_head": ValueHead(base.config.d_model).to(device)})
    counts, config = count_parameters("google/flan-t5-base", lora)
    static = weight_bytes(counts, "bfloat16", None) + trainable_bytes(counts)
    assert abs(torch.cuda.memory_allocated() - start - static) < 16 * 1024**2  # allocator rounding only
    model, head = policy["model"], policy["value_head"]
    model.eval()
    inputs = _inputs(model="google/flan-t5-base")
    batch, q, r = inputs.mini_batch, inputs.prompt_len, inputs.max_new_tokens + 1
    ids = torch.randint(2, 32000, (batch, q), device=device)
    dec = torch.randint(2, 32000, (batch, r), device=device)
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-5)
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec, output_hidden_states=True, use_cache=False)
    values = head(out.decoder_hidden_states[-1])
    logits = out.logits[:, :-1].float()
    logprobs = logprobs_from_logits(logits, dec[:, 1:])
    (logprobs.mean() + values.mean()).backward()
    optimizer.step()
    peak_training = torch.cuda.max_memory_allocated() - before
    p = plan_for(inputs)
    predicted = (optimizer_bytes(counts) + p.components["training: grads + activations + logits"])
    assert abs(predicted - peak_training) / peak_training < 0.25, (predicted / GIB, peak_training / GIB)


def test_readme_table_is_the_planner_output(repo_root, capsys):
    """The README's memory table must be what `python -m train.plan --table` prints with the shipped code."""
    table = main(["--table"])
    capsys.readouterr()
    expected = [line for line in table.splitlines() if line.startswith("| google/")]
    readme = [line for line in (repo_root / "README.md").read_text().splitlines() if line.startswith("| google/")]
    assert len(expected) == 20  # small..xxl x {1, 8} GPUs x ZeRO {2, 3}
    assert readme == expected, "README table is stale: paste the output of `python -m train.plan --table`"
