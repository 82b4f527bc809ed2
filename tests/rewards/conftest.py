"""Fixtures of the reward tests: a random classifier whose labels come in the reverse order, the reward server as a
subprocess, and the in-process scorer it must agree with."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaForSequenceClassification

from rewards.config import RewardConfig
from rewards.scorer import RewardScorer
from helpers import REWARD_MAX_CHARS, REWARD_MAX_TEXTS, RewardServerProcess

WORDS = "you are a kind friend lazy stupid coward thank for the help I hate nice day idiot".split()


def build_tiny_classifier(out_dir, id2label: dict[int, str], max_positions: int = 34, sentinel_max_length=True):
    """A random 2-class RoBERTa + word-level tokenizer saved to out_dir (labels in the order given)."""
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(set(w.lower() for w in WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_input_names=["input_ids", "attention_mask"],
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        # The huge "unknown limit" value some hub tokenizers carry; the model's positions must win.
        model_max_length=int(1e30) if sentinel_max_length else max_positions - 2,
    )
    assert len(tokenizer) == len(vocab)
    config = RobertaConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=max_positions, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        num_labels=len(id2label), id2label=id2label, label2id={v: k for k, v in id2label.items()},
    )
    torch.manual_seed(0)
    model = RobertaForSequenceClassification(config)
    # Larger weights in the head so the two logits clearly differ on a random model.
    torch.nn.init.normal_(model.classifier.out_proj.weight, std=2.0)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def reversed_classifier(tmp_path_factory):
    return build_tiny_classifier(tmp_path_factory.mktemp("reversed"), {0: "hate", 1: "nothate"})


@pytest.fixture(scope="session")
def three_label_classifiers(tmp_path_factory):
    """(multi-label, single-label) tiny classifiers with the classes toxic, insult, threat: the same weights, one
    config saying problem_type multi_label_classification (as unitary/toxic-bert's does)."""
    labels = {0: "toxic", 1: "insult", 2: "threat"}
    multi = build_tiny_classifier(tmp_path_factory.mktemp("multi"), labels)
    config = json.loads((multi / "config.json").read_text())
    (multi / "config.json").write_text(json.dumps({**config, "problem_type": "multi_label_classification"}))
    return multi, build_tiny_classifier(tmp_path_factory.mktemp("single"), labels)


@pytest.fixture(scope="session")
def server(tiny_artifacts):
    # A 30 ms wait gives concurrent requests time to meet in one batch.
    proc = RewardServerProcess(tiny_artifacts.roberta, "--reward.batch_size", "32", "--reward_server.max_wait_ms", "30",
                               "--reward_server.max_texts_per_request", str(REWARD_MAX_TEXTS),
                               "--reward_server.max_chars", str(REWARD_MAX_CHARS))
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def local_scorer(tiny_artifacts):
    return RewardScorer.from_config(RewardConfig(model_name_or_path=str(tiny_artifacts.roberta), device="cpu"))
