"""Per-GPU memory planner for PPO with FLAN-T5 (small to xxl): does this job fit before it is queued?

    python -m train.plan --model.name_or_path google/flan-t5-xxl --plan.gpus 8 --plan.zero 3 [--model.quantization 4bit]
    python -m train.plan --config configs/flan_t5_base.yaml --plan.gradient_checkpointing true --ppo.mini_batch_size 8
    python -m train.plan --ppo.advantage_estimator rloo --rollout.samples_per_prompt 4   # critic-free, k = 4
    python -m train.plan --table            # Markdown: flan-t5 small..xxl x {1, 8} GPUs x ZeRO {2, 3}

Nothing is downloaded and no weights are made: the policy is built on the meta device from the shipped
architecture configs (`train.models.build_from_architecture`), LoRA is applied with the project's own
`apply_lora`, so parameter counts per module are exact. Sizes are the training keys of the config (`--config`,
default = the original notebook's: model.*, lora.*, ppo.batch_size/mini_batch_size/advantage_estimator,
rollout.batch_size/max_new_tokens/samples_per_prompt, data.max_prompt_tokens, reward.*); the hardware to plan for is
its `plan` section (GPUs, ZeRO stage, offload, gradient checkpointing, reward placement, GPU memory, margin);
`--section.key VALUE` overrides either. The planner models the PPO stage (the most demanding one), for the
advantage estimator it will run: gae (PPO with a value head) or the critic-free rloo and group (GRPO), which build,
train and save no value head (`ppo_core.make_estimator(...).uses_value_head`, as training decides it).

Memory model, per GPU (N = GPUs, b = bytes per element of the model dtype: fp32 4, bf16/fp16 2, k =
rollout.samples_per_prompt). "Sharded" means divided by N (rounded up). ppo.batch_size counts rows (prompts x k):
each GPU holds ceil(batch / N) rows, the k samples of each of its ceil(batch / (k N)) prompts.

Weights of the frozen base, as `train.models.load_base_model` leaves them:
  * no quantisation: every parameter in `model.dtype` (b bytes). fp16 only: T5's `_keep_in_fp32_modules`
    (the feed-forward output projections `wo`) stay fp32, as transformers does for fp16 (not for bf16).
  * 8bit (bitsandbytes LLM.int8): the Linear weights inside the blocks become int8 (1 byte/param) plus one
    fp32 scale per output row (SCB); 4bit (nf4, no double quantisation, transformers' default): 0.5 byte/param
    plus one fp32 absmax per 64-value block (0.0625 byte/param) plus a 16-entry fp32 code book per layer.
    Not quantised, as transformers + bitsandbytes do: `lm_head` (the output embedding) and `wo`
    (`_keep_in_fp32_modules`); embeddings, layer norms and the relative-position biases are not Linear layers.
    All non-quantised parameters are then fp32, because `peft.prepare_model_for_kbit_training` (called by
    `load_base_model`) casts every fp16/bf16 parameter to fp32.
  * ZeRO-3 shards them; ZeRO-3 with CPU offload keeps them on the CPU. Under ZeRO-3, each forward
    (generation included) gathers the parameters of one module at a time: the peak adds the largest T5 block
    (or the embedding / LM head) unsharded ("ZeRO-3 gathered layer"). DeepSpeed's prefetch
    (`stage3_prefetch_bucket_size`, `stage3_max_live_parameters`) can hold more; lower those if it matters.
Trainable parameters (LoRA A/B of the targeted Linear layers + the value head, `d_model + 1` in 2 tensors, for
  gae only): fp32 (peft keeps adapters in fp32 whatever the base dtype; the value head is fp32), 4 bytes/param, so
  no separate fp32 master copy. Sharded under ZeRO-3. Without a value head (rloo, group) it is absent from the
  trainable parameters, the optimizer state, the gradients and the activations alike.
KL reference adapter (only with `ppo.reference: initial_adapter`): a frozen fp32 copy of the LoRA A/B, sharded
  under ZeRO-3; the base weights are shared, so that is all the reference costs.
Optimizer: Adam (as TRL/`ppo_core`): `exp_avg` and `exp_avg_sq` in fp32 (8 bytes/param) plus a 4-byte `step`
  tensor per parameter tensor. Sharded under ZeRO >= 1; off the GPU with CPU offload.
Gradients: fp32, one per trainable parameter (the frozen base has none). Sharded under ZeRO >= 2; off the GPU
  with CPU offload. They exist from the first backward until `zero_grad`, so they count in the training phase.
Activations kept for the backward of one PPO mini-batch (per GPU: B = ceil(mini_batch / N) rows, encoder
  length Q = prompt tokens, decoder length R = max_new_tokens + 1). Per layer and token, counted from the tensors
  autograd saves (measured with `torch.autograd.graph.saved_tensors_hooks` on flan-t5-small with SDPA
  attention, eval mode as `ppo_core` runs, frozen base so no Linear input is kept for its weight gradient;
  `tests/train/test_plan.py` re-measures it):
    encoder layer, per encoder token:  b * (6 d_ff + 4 inner) + 6 * 2 norms * d_model + L_in
    decoder layer, per decoder token:  b * (6 d_ff + 6 inner) + 6 * 3 norms * d_model + L_in
    decoder layer, per encoder token:  b * 2 inner (cross-attention keys/values) + L_in
  with inner = num_heads * d_kv. 6 d_ff: the gated-GELU feed-forward keeps both projections and the
  intermediate results of the tanh-GELU; 4/6 inner: q, k, v and the attention output of each attention
  (SDPA keeps no attention weights); 6 bytes per layer norm and d_model: its input in the model
  dtype plus the fp32 upcast T5's RMSNorm computes in. L_in: each LoRA-targeted Linear casts its input to
  fp32 for the adapter (4 bytes * in_features per token; 0 when the model is fp32). Plus the value-head
  input (fp32 decoder states, 4 d_model per decoder token; gae only: without a value head the forward asks for
  no hidden states) and the log-softmax over the vocabulary kept for the backward (4 V per predicted token).
  Plus, per row and head, the additive attention masks of a padded batch (position bias + padding, b bytes each),
  which SDPA keeps for its backward: Q x Q (encoder), R x R (decoder) and R x Q (cross-attention), one of each
  for all the layers (train/attention.py; transformers' own SDPA path keeps one per layer, 18% more memory in
  `tests/train/test_plan.py`'s 400-token case); a batch without padding keeps one for all its rows (counted as
  per row: an upper bound).
  With gradient checkpointing, only each block's input is kept (b * d_model per token and layer) plus one
  block's full activations while it is recomputed. NOTE: transformers only checkpoints in training mode,
  and `ppo_core` runs the policy in eval mode (dropout off): the knob needs the policy in train mode with
  dropout 0 to have any effect.
Logits buffer: B * (R - 1) * V * 12 bytes on top of the kept log-softmax: the fp32 logits, and the fp32
  softmax and product of the entropy statistic (`ppo_loss`), alive at once.
Generation (rollout): each GPU samples k summaries for each of its P = ceil(batch / (k N)) prompts, at most
  `rollout.batch_size` prompts per generate() call, so a call has G = min(rollout.batch_size, P) * k rows
  (each prompt, and its encoder output, repeated k times for the call). Per call: decoder self-attention
  cache 2 * L_dec * G * inner * max_new_tokens * b, cross-attention cache 2 * L_dec * G * inner * Q * b, the
  expanded encoder output G * Q * d_model * b, and per-step logits G * V * 4 * 3 (scores, processed scores and
  probabilities in fp32). Plus the encoder outputs the rollout keeps to reuse in its no-grad forward passes
  (`rollout.encode_prompts`: each encoder runs once per prompt, its output indexed per row): the policy's,
  P * Q * d_model * b, and for k > 1 the adapter-off reference's as much again (a frozen reference adapter
  runs its own encoder per row). They count in the generation phase.
Peak = weights + trainable + optimizer + max(training phase, generation phase) + reward model (when it shares
  the GPU) + ZeRO-3 gathered layer + CUDA context/allocator overhead (1 GiB: the CUDA context and cuBLAS/cuDNN
  workspaces, which `torch.cuda.max_memory_allocated` does not see). The rollout's no-grad forward passes
  (old and reference log-probs) reuse the kept encoder output (counted above); their own transient activations
  hold less than the training pass and are not counted. Temporaries during
  the backward (a few layer-sized gradient tensors) and fragmentation are left to the safety margin: the job
  fits when peak <= plan.gpu_mem_gib * (1 - plan.margin) (default 10% of 80 GiB).
Reward model (RoBERTa classifier): parameters * reward dtype bytes, plus inference activations of one
  batch, batch * length * (2 intermediate + 4 hidden) * bytes (one layer at a time, no gradients). On
  "separate" placement it is reported for its own device and not added to the training GPUs; "shared" puts
  a copy on every training GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from torch import nn

from rewards.config import check_bounds
from train.cli import config_from_cli, overridden, run_cli
from train.config import BOUNDS, ExperimentConfig, LoraSettings
from train.errors import ConfigError, ModelError
from train.ppo_core import Estimator, make_estimator

GIB = 1024**3
CUDA_OVERHEAD_BYTES = 1 * GIB
DEFAULT_REWARD_MODEL = "facebook/roberta-hate-speech-dynabench-r4-target"
# RoBERTa-base with a 2-class head: the default reward model's architecture, so it needs no download.
DEFAULT_REWARD_ARCH = dict(
    vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    max_position_embeddings=514, type_vocab_size=1, num_labels=2,
)
NF4_BLOCK = 64  # bitsandbytes 4-bit block size: one fp32 absmax per 64 weights
NF4_CODE_BYTES = 16 * 4  # the nf4 code book each quantised layer holds
KEEP_FP32_MODULES = ("wo",)  # T5PreTrainedModel._keep_in_fp32_modules
FF_SAVED = 6  # d_ff-sized tensors kept per gated-GELU feed-forward (measured, see the docstring)
NORM_BYTES = 6  # bytes kept per layer norm per d_model element (model-dtype input + fp32 upcast)
LOGITS_EXTRA_BYTES = 12  # fp32 logits + entropy softmax + product, per vocabulary entry
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
Quant = Optional[Literal["8bit", "4bit"]]


# ----------------------------------------------------------------------------------------------------
# Parameter counts from the meta-device model


@dataclass
class ParamCounts:
    """Exact parameter counts of base + LoRA + value head, grouped by how they are stored. `count_parameters` counts
    the value head (gae's); `plan` sets it to 0 for an estimator without one."""

    quantizable: int  # Linear weights in the blocks (quantised under 8/4bit)
    quantizable_linears: int
    quantizable_out_rows: int  # sum of out_features over those Linears (8bit scales)
    keep_fp32: int  # `wo` weights (fp32 under fp16 and under quantisation)
    other: int  # embeddings, norms, relative biases, lm_head
    lora: int
    lora_tensors: int
    value_head: int  # d_model + 1 (weight + bias), 0 without a value head
    largest_gathered: int  # params of the biggest single module ZeRO-3 gathers at once
    lora_targets: list[str] = field(default_factory=list)

    @property
    def base(self) -> int:
        return self.quantizable + self.keep_fp32 + self.other

    @property
    def trainable(self) -> int:
        return self.lora + self.value_head

    @property
    def trainable_tensors(self) -> int:
        return self.lora_tensors + (2 if self.value_head else 0)  # value head weight + bias


def _is_lm_head(name: str) -> bool:
    return name == "lm_head" or name.endswith(".lm_head")


def count_parameters(model_name: str, lora: LoraSettings) -> tuple[ParamCounts, object]:
    """Counts for `model_name` (a shipped FLAN-T5 id or a local directory) with a fresh LoRA, and its config."""
    from train.models import apply_lora, build_from_architecture

    base = build_from_architecture(model_name, device="meta")
    config = base.config
    quantizable = linears = rows = keep = 0
    linear_params: set[int] = set()
    for name, module in base.named_modules():
        if isinstance(module, nn.Linear) and not _is_lm_head(name):
            linear_params.add(id(module.weight))
            if name.rsplit(".", 1)[-1] in KEEP_FP32_MODULES:
                keep += module.weight.numel()
            else:
                quantizable += module.weight.numel()
                linears += 1
                rows += module.out_features
    total = sum(p.numel() for p in base.parameters())  # deduplicated: shared tensors once
    blocks = [m for n, m in base.named_modules() if type(m).__name__.endswith("Block")]
    singles = [base.get_input_embeddings(), base.get_output_embeddings()]
    largest = max(sum(p.numel() for p in m.parameters()) for m in blocks + [s for s in singles if s is not None])
    peft_model = apply_lora(base, lora)
    lora_params = [p for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n]
    return (
        ParamCounts(
            quantizable=quantizable,
            quantizable_linears=linears,
            quantizable_out_rows=rows,
            keep_fp32=keep,
            other=total - quantizable - keep,
            lora=sum(p.numel() for p in lora_params),
            lora_tensors=len(lora_params),
            value_head=config.d_model + 1,
            largest_gathered=largest,
            lora_targets=list(lora.target_modules),
        ),
        config,
    )


def weight_bytes(counts: ParamCounts, dtype: str, quant: Quant) -> int:
    """Bytes of the frozen base weights as `load_base_model` stores them (see the module docstring)."""
    b = DTYPE_BYTES[dtype]
    if quant is None:
        keep_bytes = 4 if dtype == "float16" else b
        return counts.quantizable * b + counts.keep_fp32 * keep_bytes + counts.other * b
    non_quantised = (counts.keep_fp32 + counts.other) * 4  # prepare_model_for_kbit_training -> fp32
    if quant == "8bit":
        return counts.quantizable + 4 * counts.quantizable_out_rows + non_quantised
    blocks = math.ceil(counts.quantizable / NF4_BLOCK)
    packed = math.ceil(counts.quantizable / 2)
    return packed + 4 * blocks + NF4_CODE_BYTES * counts.quantizable_linears + non_quantised


def trainable_bytes(counts: ParamCounts) -> int:
    """LoRA + value head, fp32."""
    return 4 * counts.trainable


def optimizer_bytes(counts: ParamCounts) -> int:
    """Adam: exp_avg + exp_avg_sq (fp32) per trainable parameter, plus a 4-byte `step` per tensor."""
    return 8 * counts.trainable + 4 * counts.trainable_tensors


def gradient_bytes(counts: ParamCounts) -> int:
    return 4 * counts.trainable


# ----------------------------------------------------------------------------------------------------
# Activations, generation, reward model


@dataclass
class Arch:
    d_model: int
    d_ff: int
    inner: int  # num_heads * d_kv
    heads: int
    enc_layers: int
    dec_layers: int
    vocab: int
    gated: bool

    @classmethod
    def from_config(cls, config) -> "Arch":
        return cls(
            d_model=config.d_model,
            d_ff=config.d_ff,
            inner=config.num_heads * config.d_kv,
            heads=config.num_heads,
            enc_layers=config.num_layers,
            dec_layers=config.num_decoder_layers or config.num_layers,
            vocab=config.vocab_size,
            gated=bool(getattr(config, "is_gated_act", True)),
        )


def _lora_input_bytes(arch: Arch, targets: list[str], b: int) -> tuple[int, int, int]:
    """fp32 copies of LoRA inputs per token: (encoder layer, decoder layer per decoder token, per encoder token)."""
    if b >= 4:
        return 0, 0, 0
    width = {"q": arch.d_model, "k": arch.d_model, "v": arch.d_model, "o": arch.inner,
             "wi": arch.d_model, "wi_0": arch.d_model, "wi_1": arch.d_model, "wo": arch.d_ff}
    enc = dec = cross = 0
    for t in targets:
        w = 4 * width.get(t, arch.d_model)
        enc += w  # encoder self-attention / feed-forward
        dec += w  # decoder self-attention / feed-forward
        if t in ("q", "o"):
            dec += w  # cross-attention query and output work on decoder tokens
        elif t in ("k", "v"):
            cross += w  # cross-attention keys and values read the encoder output
    return enc, dec, cross


def activation_bytes(
    arch: Arch, batch: int, prompt_len: int, response_len: int, dtype: str, lora_targets: list[str],
    gradient_checkpointing: bool = False, value_head: bool = True,
) -> int:
    """Bytes autograd keeps for the backward of one training forward (`response_len` = decoder length)."""
    b = DTYPE_BYTES[dtype]
    ff = (FF_SAVED if arch.gated else 3) * arch.d_ff
    enc_lora, dec_lora, cross_lora = _lora_input_bytes(arch, lora_targets, b)
    enc_layer = batch * prompt_len * (b * (ff + 4 * arch.inner) + NORM_BYTES * 2 * arch.d_model + enc_lora)
    dec_layer = batch * response_len * (b * (ff + 6 * arch.inner) + NORM_BYTES * 3 * arch.d_model + dec_lora)
    dec_layer += batch * prompt_len * (b * 2 * arch.inner + cross_lora)
    head = batch * (response_len - 1) * arch.vocab * 4  # log-softmax
    if value_head:
        head += batch * response_len * 4 * arch.d_model  # its fp32 input
    # A padded batch's additive attention masks (position bias + padding, per row and head), which SDPA keeps for its
    # backward: one per attention kind, shared by the layers (train/attention.py): encoder, decoder self, cross.
    head += batch * arch.heads * (prompt_len ** 2 + response_len ** 2 + response_len * prompt_len) * b
    if not gradient_checkpointing:
        return arch.enc_layers * enc_layer + arch.dec_layers * dec_layer + head
    block_inputs = batch * b * arch.d_model * (arch.enc_layers * prompt_len + arch.dec_layers * response_len)
    return block_inputs + max(enc_layer, dec_layer) + head


def logits_buffer_bytes(arch: Arch, batch: int, response_len: int) -> int:
    return batch * (response_len - 1) * arch.vocab * LOGITS_EXTRA_BYTES


def generation_bytes(arch: Arch, gen_batch: int, prompt_len: int, new_tokens: int, dtype: str) -> int:
    """KV caches (self + cross attention), encoder output and per-step logits of one generate() call."""
    b = DTYPE_BYTES[dtype]
    self_cache = 2 * arch.dec_layers * gen_batch * arch.inner * new_tokens * b
    cross_cache = 2 * arch.dec_layers * gen_batch * arch.inner * prompt_len * b
    encoder_out = gen_batch * prompt_len * arch.d_model * b
    step_logits = gen_batch * arch.vocab * 4 * 3
    return self_cache + cross_cache + encoder_out + step_logits


def kept_encoder_bytes(arch: Arch, prompts: int, samples_per_prompt: int, reference_adapter: bool, prompt_len: int,
                       dtype: str) -> int:
    """The encoder outputs the rollout keeps for its no-grad passes, one per prompt: the policy's, and for k > 1
    the adapter-off reference's (a frozen reference adapter runs its own encoder per row instead)."""
    kept = prompts * (2 if samples_per_prompt > 1 and not reference_adapter else 1)
    return kept * prompt_len * arch.d_model * DTYPE_BYTES[dtype]


@functools.lru_cache(maxsize=None)
def reward_model_params(name_or_path: str) -> tuple[int, int, int]:
    """(parameters, hidden size, intermediate size) of the reward classifier, from its config only."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, RobertaConfig

    if (Path(name_or_path) / "config.json").is_file():
        config = AutoConfig.from_pretrained(name_or_path)
    elif name_or_path == DEFAULT_REWARD_MODEL:
        config = RobertaConfig(**DEFAULT_REWARD_ARCH)
    else:
        raise ConfigError(
            f"the planner cannot size reward model {name_or_path!r} offline: pass a local directory with its "
            f"config.json via --reward.model_name_or_path DIR (or use {DEFAULT_REWARD_MODEL})"
        )
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    return sum(p.numel() for p in model.parameters()), config.hidden_size, config.intermediate_size


# ----------------------------------------------------------------------------------------------------
# The plan


# The ranges of the plan section, keyed by PlanInputs' field of the same name.
PLAN_BOUNDS = {key.removeprefix("plan."): rule for key, rule in BOUNDS.items() if key.startswith("plan.")}


@dataclass
class PlanInputs:
    """Everything the estimate depends on, flat, so that a knob is one `dataclasses.replace`. `from_config` fills
    it from an ExperimentConfig: the defaults live there (each field names its config key)."""

    model: str  # model.name_or_path
    gpus: int  # plan.gpus
    zero: int  # plan.zero: 0 = plain data parallel (DDP), 1/2/3 = DeepSpeed ZeRO stage
    dtype: str  # model.dtype
    quant: Quant  # model.quantization
    lora: LoraSettings  # lora
    batch: int  # ppo.batch_size, global
    mini_batch: int  # ppo.mini_batch_size, global
    gen_batch: int  # rollout.batch_size: prompts per generate() call
    samples_per_prompt: int  # rollout.samples_per_prompt (k): summaries per prompt; batch counts prompts x k rows
    estimator: str  # ppo.advantage_estimator: gae (value head) or the critic-free rloo / group
    prompt_len: int  # data.max_prompt_tokens
    max_new_tokens: int  # rollout.max_new_tokens
    gradient_checkpointing: bool  # plan.gradient_checkpointing
    reference_adapter: bool  # ppo.reference: initial_adapter keeps a frozen fp32 copy of the LoRA
    offload: bool  # plan.offload: DeepSpeed CPU offload, optimizer (ZeRO >= 2) and, under ZeRO-3, parameters
    reward_model: str  # reward.model_name_or_path
    reward_dtype: str  # reward.dtype
    reward_batch: int  # reward.batch_size
    reward_len: int  # reward.max_length (null: 512, RoBERTa's limit)
    reward_device: Literal["separate", "shared"]  # plan.reward_device
    gpu_mem_gib: float  # plan.gpu_mem_gib
    margin: float  # plan.margin

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> "PlanInputs":
        p = cfg.plan
        return cls(
            model=cfg.model.name_or_path, gpus=p.gpus, zero=p.zero, dtype=cfg.model.dtype, quant=cfg.model.quantization,
            lora=dataclasses.replace(cfg.lora), batch=cfg.ppo.batch_size, mini_batch=cfg.ppo.mini_batch_size,
            gen_batch=cfg.rollout.batch_size, samples_per_prompt=cfg.rollout.samples_per_prompt,
            estimator=cfg.ppo.advantage_estimator, prompt_len=cfg.data.max_prompt_tokens,
            max_new_tokens=cfg.rollout.max_new_tokens, gradient_checkpointing=p.gradient_checkpointing,
            reference_adapter=cfg.ppo.reference == "initial_adapter", offload=p.offload,
            reward_model=cfg.reward.model_name_or_path, reward_dtype=cfg.reward.dtype, reward_batch=cfg.reward.batch_size,
            reward_len=cfg.reward.max_length or 512, reward_device=p.reward_device, gpu_mem_gib=p.gpu_mem_gib,
            margin=p.margin,
        )

    def check(self) -> None:
        """Value checks, named by config key. The plan section's ranges are BOUNDS' plan.* (already checked when the
        config loaded; checked again here for inputs built or replaced in code, e.g. the knobs and --table)."""
        check_bounds(self, PLAN_BOUNDS, "plan.")
        if self.offload and self.zero < 2:
            raise ConfigError("plan.offload needs DeepSpeed ZeRO-2 or ZeRO-3: add --plan.zero 2 or --plan.zero 3")
        if self.dtype not in DTYPE_BYTES or self.reward_dtype not in DTYPE_BYTES:
            raise ConfigError(f"model.dtype and reward.dtype must be one of {', '.join(DTYPE_BYTES)}")
        if self.quant not in (None, "8bit", "4bit"):
            raise ConfigError(f"model.quantization must be 8bit, 4bit or null, got {self.quant!r}")
        keys = {"batch": "ppo.batch_size", "mini_batch": "ppo.mini_batch_size", "gen_batch": "rollout.batch_size",
                "prompt_len": "data.max_prompt_tokens", "max_new_tokens": "rollout.max_new_tokens",
                "reward_batch": "reward.batch_size", "reward_len": "reward.max_length",
                "samples_per_prompt": "rollout.samples_per_prompt"}
        for name, key in keys.items():
            if getattr(self, name) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, name)}")
        self.resolved_estimator()  # its own checks: the name, and k >= 2 for rloo / group

    def resolved_estimator(self) -> Estimator:
        """ppo.advantage_estimator resolved as training resolves it; the KL placement, gamma, lambda and whitening
        it also takes change no memory."""
        return make_estimator(self.estimator, "auto", self.samples_per_prompt, gamma=1.0, lam=1.0, whiten_rewards=False)

    @property
    def value_head(self) -> bool:
        """gae trains a value head; the critic-free rloo and group build none."""
        return self.resolved_estimator().uses_value_head


@dataclass
class Plan:
    inputs: PlanInputs
    counts: ParamCounts
    components: dict[str, int]  # per-GPU bytes that make up the peak
    reward_own_device: int  # bytes on the reward model's own device (separate placement), else 0
    notes: list[str]
    phases: dict[str, int] = field(default_factory=dict)  # "training" and "generation" transient bytes

    @property
    def peak(self) -> int:
        return sum(self.components.values())

    @property
    def limit(self) -> float:
        return self.inputs.gpu_mem_gib * GIB * (1 - self.inputs.margin)

    @property
    def fits(self) -> bool:
        return self.peak <= self.limit


def _shard(n: int, gpus: int, sharded: bool) -> int:
    return math.ceil(n / gpus) if sharded else n


def plan(inputs: PlanInputs, counts: Optional[ParamCounts] = None, config=None) -> Plan:
    """The per-GPU peak of one PPO step (generation + update) for `inputs`."""
    inputs.check()
    if counts is None or config is None:
        counts, config = count_parameters(inputs.model, inputs.lora)
    if not inputs.value_head:
        counts = dataclasses.replace(counts, value_head=0)  # rloo / group: no value head to train, step or back-propagate
    arch = Arch.from_config(config)
    n, z, k, notes = inputs.gpus, inputs.zero, inputs.samples_per_prompt, []
    rows = math.ceil(inputs.batch / n)
    prompts = math.ceil(inputs.batch / (k * n))  # a prompt's k rows stay on one GPU
    mini = math.ceil(inputs.mini_batch / n)
    if inputs.batch % (k * n) or inputs.mini_batch % n:
        notes.append(f"ppo.batch_size ({inputs.batch}) is global and must be a multiple of {k * n} "
                     f"(rollout.samples_per_prompt {k} x {n} GPUs), ppo.mini_batch_size ({inputs.mini_batch}) of {n}: "
                     f"raise them (planned per GPU with {rows} rows from {prompts} prompt(s), {mini} per mini-batch)")
    gen = min(inputs.gen_batch, prompts) * k  # rows per generate() call: k samples of each prompt
    response_len = inputs.max_new_tokens + 1  # decoder start token + generated tokens

    weights = weight_bytes(counts, inputs.dtype, inputs.quant)
    weights = 0 if (z == 3 and inputs.offload) else _shard(weights, n, z == 3)
    offloaded = inputs.offload
    components = {
        "weights (frozen base)": weights,
        f"trainable (LoRA{' + value head' if counts.value_head else ''})": _shard(trainable_bytes(counts), n, z == 3),
        "optimizer (Adam)": 0 if offloaded else _shard(optimizer_bytes(counts), n, z >= 1),
    }
    if inputs.reference_adapter:
        components["KL reference adapter (frozen LoRA)"] = _shard(counts.lora * 4, n, z == 3)
    train_phase = (
        (0 if offloaded else _shard(gradient_bytes(counts), n, z >= 2))
        + activation_bytes(arch, mini, inputs.prompt_len, response_len, inputs.dtype, counts.lora_targets,
                           inputs.gradient_checkpointing, value_head=counts.value_head > 0)
        + logits_buffer_bytes(arch, mini, response_len)
    )
    gen_phase = (generation_bytes(arch, gen, inputs.prompt_len, inputs.max_new_tokens, inputs.dtype)
                 + kept_encoder_bytes(arch, prompts, k, inputs.reference_adapter, inputs.prompt_len, inputs.dtype))
    components["training: grads + activations + logits"] = train_phase if train_phase >= gen_phase else 0
    components["generation: KV cache + encoder + logits"] = gen_phase if gen_phase > train_phase else 0
    notes.append(f"training phase {fmt_gib(train_phase)} vs generation phase {fmt_gib(gen_phase)}: the larger counts")
    if z == 3:
        components["ZeRO-3 gathered layer"] = counts.largest_gathered * DTYPE_BYTES[inputs.dtype]

    r_params, r_hidden, r_inter = reward_model_params(inputs.reward_model)
    rb = DTYPE_BYTES[inputs.reward_dtype]
    reward = r_params * rb + inputs.reward_batch * inputs.reward_len * (2 * r_inter + 4 * r_hidden) * rb
    components["reward model"] = reward if inputs.reward_device == "shared" else 0
    components["CUDA context + allocator"] = CUDA_OVERHEAD_BYTES
    return Plan(inputs, counts, components, reward if inputs.reward_device == "separate" else 0, notes,
                {"training": train_phase, "generation": gen_phase})


# ----------------------------------------------------------------------------------------------------
# Knobs


def _knobs(inputs: PlanInputs) -> list[tuple[str, PlanInputs]]:
    """Single changes that can lower the per-GPU peak, each as a description and the changed inputs."""
    r = dataclasses.replace
    knobs: list[tuple[str, PlanInputs]] = []
    if inputs.zero < 3:
        knobs.append(("--plan.zero 3 (shard the frozen weights too)", r(inputs, zero=3)))
    knobs.append((f"--plan.gpus {inputs.gpus * 2} (more GPUs)", r(inputs, gpus=inputs.gpus * 2)))
    if inputs.quant != "4bit":
        knobs.append(("--model.quantization 4bit (QLoRA base weights)", r(inputs, quant="4bit")))
    if math.ceil(inputs.mini_batch / inputs.gpus) > 1:
        knobs.append((f"--ppo.mini_batch_size {max(inputs.gpus, inputs.mini_batch // 2)} (smaller PPO mini-batch)",
                      r(inputs, mini_batch=max(inputs.gpus, inputs.mini_batch // 2))))
    if not inputs.gradient_checkpointing:
        knobs.append(("--plan.gradient_checkpointing true", r(inputs, gradient_checkpointing=True)))
    if inputs.max_new_tokens > 32:
        knobs.append((f"--rollout.max_new_tokens {inputs.max_new_tokens // 2}",
                      r(inputs, max_new_tokens=inputs.max_new_tokens // 2)))
    if not inputs.offload:
        knobs.append(("--plan.zero 3 --plan.offload true (DeepSpeed CPU offload of parameters and optimizer)",
                      r(inputs, zero=3, offload=True)))
    if inputs.reward_device == "shared":
        knobs.append(("--plan.reward_device separate (classifier on its own device)", r(inputs, reward_device="separate")))
    return knobs


def suggest_knob(current: Plan) -> Optional[tuple[str, Plan]]:
    """The single knob that makes a non-fitting plan fit with the biggest saving, else the biggest saving."""
    if current.fits:
        return None
    tried = [(name, plan_for(inputs)) for name, inputs in _knobs(current.inputs)]
    fitting = [t for t in tried if t[1].fits]
    pool = fitting or tried
    return min(pool, key=lambda t: t[1].peak) if pool else None


_COUNTS_CACHE: dict[tuple, tuple[ParamCounts, object]] = {}


def plan_for(inputs: PlanInputs) -> Plan:
    """`plan` with the meta-device model built once per model and LoRA setting."""
    key = (inputs.model, tuple(inputs.lora.target_modules), inputs.lora.r)
    if key not in _COUNTS_CACHE:
        _COUNTS_CACHE[key] = count_parameters(inputs.model, inputs.lora)
    counts, config = _COUNTS_CACHE[key]
    return plan(inputs, counts, config)


# ----------------------------------------------------------------------------------------------------
# Output


def fmt_gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def format_plan(p: Plan) -> str:
    i = p.inputs
    quant = f", {i.quant}" if i.quant else ""
    zero = f"ZeRO-{i.zero}" if i.zero else "DDP (no ZeRO)"
    k = i.samples_per_prompt
    lines = [
        f"{i.model}: {p.counts.base:,} base parameters, {p.counts.trainable:,} trainable (LoRA r={i.lora.r} on "
        f"{','.join(i.lora.target_modules)}{' + value head' if p.counts.value_head else ''})",
        f"{i.gpus} GPU(s) x {i.gpu_mem_gib:g} GiB, {zero}{' + CPU offload' if i.offload else ''}, {i.dtype}{quant}, "
        f"gradient checkpointing {'on' if i.gradient_checkpointing else 'off'}, reward model {i.reward_device}",
        f"estimator {i.estimator} ({'with a value head' if p.counts.value_head else 'critic-free: no value head'}), "
        f"{k} summar{'y' if k == 1 else 'ies'} per prompt: PPO batch {i.batch} rows ({i.batch // k} prompts x {k}) / "
        f"mini-batch {i.mini_batch} (global), prompt {i.prompt_len} + {i.max_new_tokens} new tokens",
        "",
        f"{'per GPU':<42} {'memory':>12}",
        "-" * 55,
    ]
    for name, value in p.components.items():
        if value:
            lines.append(f"{name:<42} {fmt_gib(value):>12}")
    lines += ["-" * 55, f"{'peak':<42} {fmt_gib(p.peak):>12}",
              f"{'usable (after ' + format(i.margin, '.0%') + ' safety margin)':<42} {fmt_gib(p.limit):>12}", ""]
    if p.reward_own_device:
        lines.append(f"reward model on its own device: {fmt_gib(p.reward_own_device)} ({i.reward_model}, {i.reward_dtype})")
    lines += [f"note: {n}" for n in p.notes]
    if p.fits:
        lines.append(f"verdict: FITS ({fmt_gib(p.limit - p.peak)} to spare per GPU)")
    else:
        lines.append(f"verdict: DOES NOT FIT ({fmt_gib(p.peak - p.limit)} over per GPU)")
        knob = suggest_knob(p)
        if knob is not None:
            name, after = knob
            outcome = "fits" if after.fits else "still does not fit; combine knobs"
            lines.append(f"turn this knob: {name} -> peak {fmt_gib(after.peak)} per GPU, {outcome}")
            others = [f"{n} ({fmt_gib(q.peak)})" for n, q in ((n, plan_for(i)) for n, i in _knobs(p.inputs))
                      if q.fits and n != name]
            if others:
                lines.append("other single knobs that fit: " + "; ".join(others))
    return "\n".join(lines)


def markdown_table(base: PlanInputs, models: Optional[list[str]] = None, gpus=(1, 8), zeros=(2, 3)) -> str:
    """Peak per GPU for each model x GPU count x ZeRO stage (other settings, the estimator and k included, from
    `base`)."""
    from train.models import ARCHITECTURES

    models = models or list(ARCHITECTURES)
    header = "| model | GPUs | ZeRO | weights | optimizer | training phase | generation phase | peak / GPU | fits |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for model in models:
        for n in gpus:
            for z in zeros:
                # Global batch sizes must divide over the GPUs (ppo_core checks): at least one prompt (k rows) per GPU.
                inputs = dataclasses.replace(base, model=model, gpus=n, zero=z,
                                             batch=max(base.batch, n * base.samples_per_prompt),
                                             mini_batch=max(base.mini_batch, n))
                p = plan_for(inputs)
                train, gen = p.phases["training"], p.phases["generation"]
                verdict = "yes" if p.fits else "no"
                if not p.fits:
                    knob = suggest_knob(p)
                    verdict += f" ({knob[0].split(' (')[0]}{'' if knob[1].fits else ' +more'})" if knob else ""
                lines.append(
                    f"| {model} | {n} | {z} | {fmt_gib(p.components['weights (frozen base)'])} | "
                    f"{fmt_gib(p.components['optimizer (Adam)'])} | {fmt_gib(train)} | {fmt_gib(gen)} | {fmt_gib(p.peak)} | "
                    f"{verdict} |"
                )
    return "\n".join(lines)


# The planner's flags of earlier versions and the keys that replaced them: each stops with one line naming its key.
FORMER_FLAGS = {
    "model": "model.name_or_path", "gpus": "plan.gpus", "zero": "plan.zero", "quant": "model.quantization",
    "dtype": "model.dtype", "batch": "ppo.batch_size", "mini_batch": "ppo.mini_batch_size",
    "gen_batch": "rollout.batch_size", "prompt_len": "data.max_prompt_tokens", "max_new_tokens": "rollout.max_new_tokens",
    "gradient_checkpointing": "plan.gradient_checkpointing: true", "offload": "plan.offload: true",
    "reward_device": "plan.reward_device", "gpu_mem": "plan.gpu_mem_gib", "margin": "plan.margin",
}
EPILOG = """\
The hardware to plan for is the plan section (train/config.py PlanConfig):
  --plan.gpus N  --plan.zero 0|1|2|3  --plan.offload true  --plan.gradient_checkpointing true
  --plan.reward_device separate|shared  --plan.gpu_mem_gib GIB  --plan.margin FRACTION
Sizes are training keys: --model.name_or_path, --model.dtype, --model.quantization, --lora.r,
--lora.target_modules, --ppo.advantage_estimator, --ppo.batch_size, --ppo.mini_batch_size, --rollout.batch_size,
--rollout.samples_per_prompt, --rollout.max_new_tokens, --data.max_prompt_tokens, --reward.model_name_or_path,
--reward.batch_size, ..."""


def main(argv: Optional[list[str]] = None) -> Plan | str:
    def add_arguments(parser) -> None:
        parser.add_argument("--table", action="store_true",
                            help="Markdown table: flan-t5 small..xxl x {1, 8} GPUs x ZeRO {2, 3}, other settings from the config")

    args, cfg = config_from_cli(__doc__.split("\n\n")[0], argv, add_arguments, config_required=False,
                                renamed=FORMER_FLAGS, prog="python -m train.plan", epilog=EPILOG)
    inputs = PlanInputs.from_config(cfg)
    inputs.check()
    swept = overridden(argv, ("model.name_or_path", "plan.gpus", "plan.zero"))
    if args.table and swept:
        raise ConfigError(f"--table sweeps the model, plan.gpus and plan.zero itself: drop --{' --'.join(swept)}, "
                          "or drop --table for one plan")
    if args.table:
        table = markdown_table(inputs)
        print(f"ppo.advantage_estimator {inputs.estimator}, rollout.samples_per_prompt {inputs.samples_per_prompt}"
              f"{'' if inputs.value_head else ' (no value head)'}:\n")
        print(table)
        return table
    try:
        p = plan_for(inputs)
    except ModelError as e:
        raise ConfigError(f"model.name_or_path: {e}") from None
    print(format_plan(p))
    return p


if __name__ == "__main__":
    run_cli(main)
