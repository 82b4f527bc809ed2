"""Model factory: the seq2seq policy (base + LoRA + value head), its saving and loading, and the shipped architectures.

    base = load_base_model(cfg.model)                  # FLAN-T5 (or a local T5), optionally 8/4-bit
    peft_model = apply_lora(base, cfg.lora, adapter)   # fresh LoRA or an existing adapter
    policy = Seq2SeqPolicy(peft_model, ValueHead(d_model))
    policy, tokenizer = load_policy(cfg)               # all of the above

The PPO KL reference is the same base with the adapter switched off (`policy.adapter_disabled()`), so
no second copy of the base is held. `build_from_architecture` builds the shipped FLAN-T5 architectures
(`configs/architectures/`) with random weights, on the meta device by default, for the parameter report
(train/param_report.py) and the memory planner (train/plan.py).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import warnings
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from rewards.hub import hub_access
from rewards.sources import DTYPES, is_hub_id
from train.attention import use_shared_mask_attention
from train.config import LoraSettings, ModelConfig
from train.errors import ModelError

ARCHITECTURES_DIR = Path(__file__).resolve().parents[1] / "configs" / "architectures"
FLAN_T5_SIZES = ("small", "base", "large", "xl", "xxl")
# Hub id -> shipped config directory (config.json only, no weights).
ARCHITECTURES: dict[str, Path] = {f"google/flan-t5-{s}": ARCHITECTURES_DIR / f"flan-t5-{s}" for s in FLAN_T5_SIZES}

VALUE_HEAD_FILE = "value_head.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
MODEL_FIX = "pass it with --model.name_or_path DIR"
ADAPTER_FIX = "set model.adapter to DIR"



def torch_dtype(name: str) -> torch.dtype:
    """"bfloat16" -> torch.bfloat16 (also float32, float16)."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ModelError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None


def untie_lm_head(model: nn.Module) -> nn.Module:
    """Give a T5 built from a config its own LM head, as FLAN-T5 checkpoints have.

    transformers 5.x forces `tie_word_embeddings=True` for every T5Config, so a model built from a config
    shares `lm_head.weight` with the embeddings and has 32128 x d_model fewer parameters than the real
    checkpoint. (Loading a real checkpoint is fine: both tensors are present and differ, so they stay untied.)
    """
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
        getattr(model, "all_tied_weights_keys", {}).pop("lm_head.weight", None)
    return model


# ----------------------------------------------------------------------------------------------------
# Loading the base model and tokenizer


class _UntiedHeadWarningFilter(logging.Filter):
    """Drop the warning transformers 5 prints for every untied T5 checkpoint (expected for FLAN-T5)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("The tied weights mapping and config for this model specifies to tie" in msg and "NOT" in msg)


_UNTIED_FILTER = _UntiedHeadWarningFilter()


def _filter_untied_head_warning() -> None:
    # Logger filters only see records created at that logger, so attach to the one that emits it.
    logger = logging.getLogger("transformers.modeling_utils")
    if _UNTIED_FILTER not in logger.filters:
        logger.addFilter(_UNTIED_FILTER)


def _check_source(name_or_path: str, what: str) -> None:
    """Fail early, without touching the network, for a local path that does not exist."""
    if Path(name_or_path).exists():
        return
    if not is_hub_id(name_or_path):
        raise ModelError(
            f"{what} {name_or_path!r} not found: no such local directory, and it is not a hub id "
            "(owner/name). Check --model.name_or_path."
        )


def _load_error(name_or_path: str, what: str, err: Exception) -> ModelError:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if Path(name_or_path).is_dir():
        return ModelError(f"could not load {what} from local directory {name_or_path!r}: {first_line}")
    return ModelError(
        f"could not load {what} {name_or_path!r}: it is not a local directory and it is not available from "
        f"the hub or the local cache (offline?): {first_line}. Download it once where there is internet, "
        "or pass a local directory with --model.name_or_path DIR."
    )


def load_tokenizer(model_cfg: ModelConfig):
    """The tokenizer stored with the model (hub id or local directory)."""
    from transformers import AutoTokenizer

    _check_source(model_cfg.name_or_path, "tokenizer")
    try:
        with hub_access(model_cfg.name_or_path, "tokenizer", MODEL_FIX, ModelError):
            return AutoTokenizer.from_pretrained(
                model_cfg.name_or_path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
            )
    except (OSError, ValueError) as e:
        raise _load_error(model_cfg.name_or_path, "tokenizer", e) from None


def _quantization_config(model_cfg: ModelConfig, dtype: torch.dtype):
    if model_cfg.quantization is None:
        return None
    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(
            f"quantization '{model_cfg.quantization}' needs a CUDA GPU and bitsandbytes: "
            "pip install -e '.[bitsandbytes]'"
        )
    from transformers import BitsAndBytesConfig

    if model_cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def load_base_model(model_cfg: ModelConfig, device_map: Any = None) -> nn.Module:
    """The pretrained seq2seq model (safetensors weights only), in `model_cfg.dtype`, optionally 8/4-bit."""
    from transformers import AutoModelForSeq2SeqLM

    dtype = torch_dtype(model_cfg.dtype)
    quantization = _quantization_config(model_cfg, dtype)
    _check_source(model_cfg.name_or_path, "model")
    if quantization is not None and device_map is None:
        device_map = {"": torch.cuda.current_device()}  # bitsandbytes weights must live on the GPU
    _filter_untied_head_warning()
    try:
        with hub_access(model_cfg.name_or_path, "model", MODEL_FIX, ModelError):
            model = AutoModelForSeq2SeqLM.from_pretrained(
                model_cfg.name_or_path,
                revision=model_cfg.revision,
                dtype=dtype,
                use_safetensors=True,
                trust_remote_code=model_cfg.trust_remote_code,
                quantization_config=quantization,
                device_map=device_map,
            )
    except (OSError, ValueError) as e:
        raise _load_error(model_cfg.name_or_path, "model", e) from None
    use_shared_mask_attention(model)
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    return model


# ----------------------------------------------------------------------------------------------------
# LoRA


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct last-component names of the Linear layers, e.g. ['k', 'lm_head', 'o', 'q', 'v', 'wi_0', ...]."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear) and name})


def _check_target_modules(model: nn.Module, targets: list[str]) -> None:
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ModelError(
            f"LoRA target module(s) {', '.join(map(repr, missing))} not found in the model; "
            f"its Linear layers are named: {', '.join(linear_module_names(model))}. Fix lora.target_modules."
        )


@contextmanager
def quiet_peft_deprecation() -> Iterator[None]:
    """peft 0.21 reads a transformers attribute that transformers 5 deprecated: not actionable for users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def check_adapter_directory(path: str | Path, what: str, fix: str) -> None:
    """`path` is a LoRA adapter directory (it holds adapter_config.json); else one error naming `what` and how to
    `fix` it."""
    if not Path(path).is_dir():
        raise ModelError(f"{what} {path} not found: {fix}")
    if not (Path(path) / ADAPTER_CONFIG_FILE).is_file():
        raise ModelError(f"{what} {path} is not a LoRA adapter directory (no {ADAPTER_CONFIG_FILE}): {fix}")


def _check_adapter_source(adapter: str) -> None:
    """A LoRA adapter directory (with its config) or something shaped like a hub id; else one clear error."""
    if Path(adapter).exists():
        check_adapter_directory(adapter, "model.adapter", "point it at a directory written by train.sft or train.ppo")
    elif not is_hub_id(adapter):
        raise ModelError(f"adapter {adapter!r} not found: no such directory, and it is not a hub id. Check model.adapter.")


def _model_name(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "_name_or_path", "") or "the base model"


def _adapter_base(adapter: str) -> str:
    """The base model named in the adapter's adapter_config.json (local, or already in the hub cache)."""
    config = Path(adapter) / ADAPTER_CONFIG_FILE
    if not config.is_file() and is_hub_id(adapter):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(adapter, ADAPTER_CONFIG_FILE)
        config = Path(cached) if isinstance(cached, str) else config
    try:
        return str(json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path") or "unrecorded")
    except (OSError, ValueError, AttributeError):
        return "unknown"


_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from checkpoint, "
    r"the shape in current model is torch\.Size\((\[[^\]]*\])\)"
)


def _mismatch_error(adapter: str, model_name: str, what: str, err: RuntimeError) -> Optional[ModelError]:
    """torch's multi-line size-mismatch report as one line: both bases and the first mismatched shape in full."""
    text = str(err)
    mismatches = _SIZE_MISMATCH.findall(text)
    if not mismatches:
        return None
    name, in_adapter, in_model = mismatches[0]
    return ModelError(
        f"{what} {adapter!r} was trained on another base model ({_adapter_base(adapter)!r} in its "
        f"{ADAPTER_CONFIG_FILE}) and does not fit {model_name!r}: {name} is {in_adapter} in the adapter but "
        f"{in_model} in the model ({len(mismatches)} mismatched tensor(s)). Load it onto its own base "
        "(--model.name_or_path), or train an adapter for this one"
    )


def _corrupt_file_error(file: str, err: Exception, fix: str) -> ModelError:
    return ModelError(f"{file} is not a valid safetensors file (truncated or damaged?): {err}; {fix}")


@contextmanager
def adapter_load_errors(adapter: str, model_name: str, what: str = "adapter") -> Iterator[None]:
    """Around loading the LoRA `adapter` onto the model `model_name`: each way it can fail as one ModelError line.

    A hub id that is not cached while the hub is unreachable fails at once (no retries); a damaged weights file
    is named; an adapter trained on another base names both bases and the first mismatched shape.
    """
    from safetensors import SafetensorError

    try:
        with hub_access(adapter, what, ADAPTER_FIX, ModelError):
            yield
    except SafetensorError as e:
        local = Path(adapter) / ADAPTER_WEIGHTS_FILE
        file = str(local) if local.is_file() else f"{ADAPTER_WEIGHTS_FILE} of {what} {adapter!r}"
        raise _corrupt_file_error(file, e, "copy the adapter again, or re-save it from its checkpoint") from None
    except RuntimeError as e:  # torch's load_state_dict: an adapter trained on another model size
        mismatch = _mismatch_error(adapter, model_name, what, e)
        if mismatch is None:
            raise
        raise mismatch from None
    except (OSError, ValueError) as e:
        raise _load_error(adapter, what, e) from None


def _load_adapter(base: nn.Module, adapter: str, trainable: bool):
    from peft import PeftModel

    _check_adapter_source(adapter)
    with adapter_load_errors(adapter, _model_name(base)), quiet_peft_deprecation():
        return PeftModel.from_pretrained(base, adapter, is_trainable=trainable)


def apply_lora(base: nn.Module, lora: LoraSettings, adapter: Optional[str] = None, trainable: bool = True):
    """Wrap `base` in a PEFT model: a fresh LoRA from `lora`, or the existing `adapter` (path or hub id)."""
    if adapter is not None:
        return _load_adapter(base, adapter, trainable)
    import peft

    _check_target_modules(base, lora.target_modules)
    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        target_modules=list(lora.target_modules),
        lora_dropout=lora.dropout,
        bias=lora.bias,
        task_type=peft.TaskType.SEQ_2_SEQ_LM,
    )
    with quiet_peft_deprecation():
        model = peft.get_peft_model(base, config)
    if not trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------------------------
# Value head and policy


class ValueHead(nn.Module):
    """Per-token value estimate from the decoder's last hidden state (as TRL's ValueHead): dropout, Linear(h, 1).

    Kept in float32 whatever the model dtype: value targets are small differences of rewards.
    """

    def __init__(self, hidden_size: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.summary = nn.Linear(hidden_size, 1, dtype=torch.float32)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, T, H) -> (B, T)."""
        hidden = self.dropout(hidden_states.to(self.summary.weight.dtype))
        return self.summary(hidden).squeeze(-1)


class Seq2SeqPolicy(nn.Module):
    """A PEFT seq2seq model plus a value head (None for the critic-free estimators): `forward` returns
    (logits, values)."""

    def __init__(self, peft_model: nn.Module, value_head: Optional[ValueHead]):
        super().__init__()
        self.peft_model = peft_model
        self.value_head = value_head
        # None: the KL reference is the base (adapter off); else the name of a frozen adapter (add_reference_adapter).
        self.reference_adapter: Optional[str] = None

    @property
    def config(self):
        return self.peft_model.config

    def _model_outputs(
        self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, hidden: bool,
        encoder_hidden_states: Optional[torch.Tensor] = None, **peft_kwargs
    ):
        if encoder_hidden_states is not None:
            from transformers.modeling_outputs import BaseModelOutput

            # The encoder's output was computed already (by `encode`): the model runs its decoder only.
            peft_kwargs["encoder_outputs"] = BaseModelOutput(last_hidden_state=encoder_hidden_states)
        return self.peft_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            output_hidden_states=hidden,
            use_cache=False,
            return_dict=True,
            **peft_kwargs,
        )

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The policy's encoder output (B, Q, d) for prompts: what `forward` and `generate` compute first."""
        encoder = self.peft_model.get_encoder()
        return encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        decoder_attention_mask: Optional[torch.Tensor] = None,
        encoder_hidden_states: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Logits (B, T, V) and float32 values (B, T) for each decoder position (None without a value head).
        `encoder_hidden_states` (B, Q, d): this policy's `encode` of the prompts, computed earlier with the same
        weights; the encoder then does not run."""
        has_values = self.value_head is not None  # only then are the decoder's hidden states kept
        out = self._model_outputs(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
                                  hidden=has_values, encoder_hidden_states=encoder_hidden_states)
        return out.logits, self.value_head(out.decoder_hidden_states[-1]) if has_values else None

    @contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """Run the frozen base model: the KL reference, without a second copy of its weights.

        Flips each adapter layer's own switch, as peft's `disable_adapter` does, but without the walk over the
        model's adapter status it makes first (20 ms a call on the tiny model, once per rollout) and without turning
        the adapter's requires_grad off and on again."""
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        layers = [m for m in self.peft_model.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
        were_disabled = [layer._disable_adapters for layer in layers]
        for layer in layers:
            layer._disable_adapters = True
        try:
            yield
        finally:
            for layer, was_disabled in zip(layers, were_disabled):
                layer._disable_adapters = was_disabled

    @torch.no_grad()
    def reference_encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The KL reference's encoder output (B, Q, d) when the reference is the base (adapter off). A frozen
        `reference_adapter` is applied by peft per forward call, not here: its encoder runs in `reference_logits`."""
        if self.reference_adapter is not None:
            raise ValueError("reference_encode serves the adapter-off reference only")
        with self.adapter_disabled():
            return self.encode(input_ids, attention_mask)

    @torch.no_grad()
    def reference_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        decoder_attention_mask: Optional[torch.Tensor] = None,
        encoder_hidden_states: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) of the KL reference: the base model with the adapter switched off, or the frozen
        `reference_adapter`. The latter goes through peft's per-call `adapter_names` (eval mode only), which
        leaves the trainable adapter active and its `requires_grad` untouched, as DDP and DeepSpeed need.
        `encoder_hidden_states` (B, Q, d): `reference_encode` of the prompts (adapter-off reference only)."""
        if self.reference_adapter is not None:
            if encoder_hidden_states is not None:
                raise ValueError("a frozen reference adapter runs its own encoder: pass no encoder_hidden_states")
            names = [self.reference_adapter] * input_ids.shape[0]
            args = (input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)
            return self._model_outputs(*args, hidden=False, adapter_names=names).logits
        with self.adapter_disabled():
            out = self._model_outputs(
                input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, hidden=False,
                encoder_hidden_states=encoder_hidden_states,
            )
        return out.logits

    def generate(self, **kwargs):
        return self.peft_model.generate(**kwargs)

    def get_base_model(self) -> nn.Module:
        """The transformers model inside (the adapter's layers in it), as peft's `get_base_model`."""
        return self.peft_model.get_base_model()

    @property
    def generation_config(self):
        return self.peft_model.generation_config


def merges_for_rollout(cfg) -> bool:
    """Whether rollouts generate with the adapter merged (ppo.merge_adapter_for_rollout): "auto" = a float32 base only.
    In bf16/fp16 the merged matrices round differently from the adapter's own path, enough that the sampling policy
    drifts from the one PPO's old log-probs come from (a KL of ~1e-4 per token); a quantized base cannot be merged
    into without requantizing it."""
    setting = cfg.ppo.merge_adapter_for_rollout
    if cfg.model.quantization is not None:
        return False
    return setting == "always" or (setting == "auto" and cfg.model.dtype == "float32")


@contextmanager
@torch.no_grad()
def adapter_merged(peft_model: nn.Module) -> Iterator[None]:
    """The active LoRA adapter merged into the base weights while the body runs (a rollout: every decoding step then
    runs the base matmuls alone, none of the adapter's), and the base weights restored exactly afterwards.

    peft's own unmerge subtracts the delta again, which leaves rounding errors in the base weights (in bf16, large
    ones); the base is the KL reference and is loaded fresh on resume, so it must not drift: the weights the merge
    changes are copied first and copied back (through .data, as peft writes them: an in-place op on the parameter
    would bump the version counter DeepSpeed ZeRO-3 checks). A layer whose weight another module shares (an lm_head
    tied to the embeddings) keeps its adapter path: merging it would change the shared matrix for every user. Costs
    one copy of the merged base matrices while merged.
    """
    from peft.tuners.lora import LoraLayer

    active = peft_model.active_adapter
    users = Counter(id(p) for _, p in peft_model.named_parameters(remove_duplicate=False))
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer) and active in m.lora_A]
    saved: list[tuple[Any, list[tuple[torch.Tensor, torch.Tensor]]]] = []
    try:
        for layer in layers:
            base = layer.get_base_layer()
            # The bias too: a LoRA bias (lora_bias) is merged into it.
            params = [p for p in (base.weight, getattr(base, "bias", None)) if p is not None]
            if any(users[id(p)] > 1 for p in params):
                continue
            saved.append((layer, [(p, p.detach().clone()) for p in params]))
            layer.merge(adapter_names=[active])
        yield
    finally:
        for layer, originals in saved:
            for param, original in originals:
                param.data.copy_(original)
            layer.merged_adapters.clear()


def save_policy(policy: Seq2SeqPolicy, directory: str | Path, tokenizer=None) -> Path:
    """Write `adapter_model.safetensors` + `adapter_config.json`, `value_head.safetensors` when the policy has a
    value head, and the tokenizer when given."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # save_embedding_layers=False: with lm_head among the LoRA targets peft would also save the frozen base head
    # (megabytes of unchanged weights, and an empty shard under ZeRO-3); the base model supplies it on load.
    # selected_adapters: only the trainable adapter, never the frozen KL reference copy.
    policy.peft_model.save_pretrained(
        str(directory), safe_serialization=True, save_embedding_layers=False,
        selected_adapters=[policy.peft_model.active_adapter],
    )
    if policy.value_head is not None:
        state = {k: v.detach().contiguous().cpu() for k, v in policy.value_head.state_dict().items()}
        save_file(state, str(directory / VALUE_HEAD_FILE))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory


def load_value_head(value_head: ValueHead, directory: str | Path) -> ValueHead:
    """Load `value_head.safetensors` from `directory` into `value_head` (in place)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory) / VALUE_HEAD_FILE
    if not path.is_file():
        raise ModelError(f"no value head in {directory}: {VALUE_HEAD_FILE} is missing (was it saved with save_policy?)")
    try:
        state = load_file(str(path), device=str(value_head.summary.weight.device))
    except SafetensorError as e:
        raise _corrupt_file_error(str(path), e, "copy the adapter directory again, or re-save it") from None
    try:
        value_head.load_state_dict(state)
    except RuntimeError as e:
        raise ModelError(f"value head in {path} does not fit this model: {str(e).splitlines()[0]}") from None
    return value_head


def load_policy(cfg, trainable: bool = True, device_map: Any = None,
                with_value_head: bool = True) -> tuple[Seq2SeqPolicy, Any]:
    """Base model + LoRA (fresh, or `cfg.model.adapter`) + value head (unless `with_value_head` is false: the
    critic-free estimators), and the tokenizer.

    `cfg` is an ExperimentConfig (or anything with `.model` and `.lora`). An adapter directory written by
    `save_policy` also restores its value head; otherwise the value head starts fresh.
    """
    tokenizer = load_tokenizer(cfg.model)
    base = load_base_model(cfg.model, device_map=device_map)
    peft_model = apply_lora(base, cfg.lora, cfg.model.adapter, trainable=trainable)
    if not with_value_head:
        return Seq2SeqPolicy(peft_model, None), tokenizer
    value_head = ValueHead(base.config.d_model, dropout=cfg.model.value_head_dropout)
    value_head.to(base.get_output_embeddings().weight.device)
    adapter = cfg.model.adapter
    if adapter is not None and (Path(adapter) / VALUE_HEAD_FILE).is_file():
        load_value_head(value_head, adapter)
    value_head.requires_grad_(trainable)
    return Seq2SeqPolicy(peft_model, value_head), tokenizer


REFERENCE_ADAPTER = "reference"


def add_reference_adapter(policy: Seq2SeqPolicy, adapter: str) -> Seq2SeqPolicy:
    """Load `adapter` a second time, frozen, as the KL reference (`ppo.reference: initial_adapter`).

    The base weights stay shared: the extra memory is one LoRA adapter. The trainable adapter stays active.
    """
    _check_adapter_source(adapter)
    peft_model = policy.peft_model
    active = peft_model.active_adapter
    trainable = [id(p) for p in policy.parameters() if p.requires_grad]
    with adapter_load_errors(adapter, _model_name(policy.peft_model.get_base_model()), "reference adapter"):
        with quiet_peft_deprecation():
            peft_model.load_adapter(adapter, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    if peft_model.active_adapter != active or [id(p) for p in policy.parameters() if p.requires_grad] != trainable:
        raise ModelError(f"loading the reference adapter {adapter!r} changed the trainable adapter (peft version?)")
    policy.reference_adapter = REFERENCE_ADAPTER
    return policy


# ----------------------------------------------------------------------------------------------------
# Architectures and parameter reports


def resolve_architecture(name_or_path: str) -> Path:
    """A directory with a config.json: a shipped FLAN-T5 architecture (hub id or 'flan-t5-base') or a local model."""
    if name_or_path in ARCHITECTURES:
        return ARCHITECTURES[name_or_path]
    shipped = ARCHITECTURES_DIR / name_or_path
    if name_or_path in {p.name for p in ARCHITECTURES.values()} and shipped.is_dir():
        return shipped
    path = Path(name_or_path)
    if (path / "config.json").is_file():
        return path
    raise ModelError(
        f"no architecture for {name_or_path!r}: it is neither a shipped one ({', '.join(ARCHITECTURES)}) "
        "nor a local model directory with a config.json"
    )


def build_from_architecture(name_or_path: str, device: str | torch.device = "meta") -> nn.Module:
    """The model described by a shipped architecture (or local config), with random weights.

    On the meta device by default, so even flan-t5-xxl costs no memory; use device="cpu" for real tensors.
    """
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    config = AutoConfig.from_pretrained(str(resolve_architecture(name_or_path)))
    with torch.device(device):
        model = AutoModelForSeq2SeqLM.from_config(config)
    use_shared_mask_attention(model)
    # transformers 5 records the config's tie_word_embeddings: false (FLAN-T5) as scale_decoder_outputs=False.
    if getattr(config, "scale_decoder_outputs", True) is False:
        untie_lm_head(model)
        if model.lm_head.weight.device.type != "meta":
            # Initialise the head as T5 does an untied one: a copy of the embeddings would be tied again
            # by from_pretrained after save_pretrained (transformers ties equal tensors on load).
            nn.init.normal_(model.lm_head.weight, mean=0.0, std=config.initializer_factor)
    return model
