"""In-process reward scoring: label lookup by name, toxicity, batching, truncation, loading errors, the
reward normaliser, the make_reward_fn placement switch and the HTTP client's retry and validation rules."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from rewards.client import RewardClient, total_backoff_s
from rewards.config import RewardConfig
from rewards.errors import RewardError
from rewards.reward_fn import make_reward_fn
from rewards.scorer import RewardScorer, scored_texts

WORDS = "you are a kind friend lazy stupid coward thank for the help I hate nice day idiot".split()
TEXTS = [
    "You are a kind friend.",
    "You stupid lazy coward, I hate you.",
    "Thank you for the help.",
    "idiot",
    "",
    "nice day " * 40,
]


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


@pytest.fixture(scope="module")
def reversed_classifier(tmp_path_factory):
    return build_tiny_classifier(tmp_path_factory.mktemp("reversed"), {0: "hate", 1: "nothate"})


def direct_logits(model_dir, texts, max_length):
    """Logits from a plain transformers forward pass, one text at a time (no padding, no batching)."""
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    with torch.no_grad():
        for text in texts:
            enc = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
            rows.append(model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[0])
    return torch.stack(rows)


def test_reward_is_the_nothate_logit_looked_up_by_name(reversed_classifier):
    scorer = RewardScorer.from_config(RewardConfig(model_name_or_path=str(reversed_classifier), device="cpu"))
    assert (scorer.reward_index, scorer.toxic_index) == (1, 0)
    scores = scorer.score(TEXTS)
    expected = direct_logits(reversed_classifier, TEXTS, scorer.max_length)
    torch.testing.assert_close(scores.logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores.rewards, expected[:, 1], atol=1e-5, rtol=1e-5)
    manual_hate = expected[:, 0].exp() / expected.exp().sum(-1)
    torch.testing.assert_close(scores.toxicity, manual_hate, atol=1e-5, rtol=1e-5)
    assert scores.rewards.dtype == torch.float32 and scores.rewards.shape == (len(TEXTS),)
    # The random head really separates the classes, so picking the wrong column would be caught.
    assert (scores.logits[:, 0] - scores.logits[:, 1]).abs().min() > 1e-3


def test_tiny_hate_classifier_toxicity_is_softmax_hate_probability(tiny_artifacts):
    scorer = RewardScorer.from_config(RewardConfig(model_name_or_path=str(tiny_artifacts.roberta), device="cpu"))
    texts = [json.loads(line)["text"] for line in (tiny_artifacts.toxicity / "test.jsonl").read_text().splitlines()[:16]]
    labels = [json.loads(line)["label"] for line in (tiny_artifacts.toxicity / "test.jsonl").read_text().splitlines()[:16]]
    scores = scorer.score(texts)
    id2label = json.loads((tiny_artifacts.roberta / "config.json").read_text())["id2label"]
    hate = next(int(i) for i, name in id2label.items() if name == "hate")
    logits = scores.logits.double()
    manual = torch.exp(logits[:, hate]) / torch.exp(logits).sum(-1)
    torch.testing.assert_close(scores.toxicity.double(), manual, atol=1e-6, rtol=1e-6)
    # The trained tiny classifier agrees with the labels, so toxicity is high exactly for the hateful texts.
    assert [bool(t > 0.5) for t in scores.toxicity] == [label == "hate" for label in labels]
    assert set(labels) == {"hate", "nothate"}


def test_batch_size_and_order_do_not_change_scores(reversed_classifier):
    cfg = RewardConfig(model_name_or_path=str(reversed_classifier), device="cpu", batch_size=1)
    one_by_one = RewardScorer.from_config(cfg).score(TEXTS)
    cfg.batch_size = 4
    batched = RewardScorer.from_config(cfg).score(TEXTS)
    torch.testing.assert_close(batched.logits, one_by_one.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched.rewards, one_by_one.rewards, atol=1e-5, rtol=1e-5)
    assert len(set(one_by_one.rewards.tolist())) == len(TEXTS)  # distinct texts: a reordering would show


def test_max_length_ignores_tokenizer_sentinel_and_uses_roberta_positions(reversed_classifier, tiny_artifacts):
    scorer = RewardScorer.from_config(RewardConfig(model_name_or_path=str(reversed_classifier), device="cpu"))
    assert scorer.tokenizer.model_max_length > 10**6
    assert scorer.max_length == 34 - 2  # max_position_embeddings - (pad_token_id + 1)
    long_text = "you are a kind friend " * 30  # 150 words, far over 32 tokens
    truncated = scorer.tokenizer(long_text, truncation=True, max_length=32)["input_ids"]
    assert len(truncated) == 32
    short_text = scorer.tokenizer.decode(truncated, skip_special_tokens=True)
    scores = scorer.score([long_text, short_text])
    torch.testing.assert_close(scores.logits[0], scores.logits[1], atol=1e-5, rtol=1e-5)

    tiny = RewardScorer.from_config(RewardConfig(model_name_or_path=str(tiny_artifacts.roberta), device="cpu"))
    config = tiny.model.config
    assert tiny.max_length == min(tiny.tokenizer.model_max_length, config.max_position_embeddings - 2)
    assert RewardScorer.from_config(
        RewardConfig(model_name_or_path=str(reversed_classifier), device="cpu", max_length=8)
    ).max_length == 8
    with pytest.raises(RewardError, match=r"max_length=500 is outside 1\.\.32"):
        RewardScorer.from_config(RewardConfig(model_name_or_path=str(reversed_classifier), device="cpu", max_length=500))


def test_scored_text_modes():
    prompts, summaries = ["Summarize: A\nSummary: ", "Summarize: B\nSummary: "], ["one.", "two."]
    assert scored_texts(prompts, summaries, "prompt_and_summary") == [p + s for p, s in zip(prompts, summaries)]
    assert scored_texts(prompts, summaries, "summary") == summaries
    with pytest.raises(RewardError, match="reward.text='both'"):
        scored_texts(prompts, summaries, "both")
    with pytest.raises(RewardError, match="2 prompts but 1 summaries"):
        scored_texts(prompts, summaries[:1], "summary")


def test_missing_model_path_is_one_clear_error(tmp_path):
    missing = tmp_path / "no-such-classifier"
    with pytest.raises(RewardError, match="does not exist") as info:
        RewardScorer.from_config(RewardConfig(model_name_or_path=str(missing), device="cpu"))
    assert str(missing) in str(info.value) and "local classifier directory" in str(info.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RewardError, match="cannot load the reward classifier from local directory"):
        RewardScorer.from_config(RewardConfig(model_name_or_path=str(empty), device="cpu"))


def test_unknown_labels_list_the_classifier_labels(reversed_classifier):
    with pytest.raises(RewardError, match=r"no single class named 'toxic'.*\['hate', 'nothate'\]"):
        RewardScorer.from_config(RewardConfig(model_name_or_path=str(reversed_classifier), toxic_label="toxic", device="cpu"))


def test_bad_devices_and_dtypes_are_reward_errors(reversed_classifier):
    with pytest.raises(RewardError, match="cuda:99"):
        RewardScorer.from_config(RewardConfig(model_name_or_path=str(reversed_classifier), device="cuda:99"))
    with pytest.raises(RewardError, match="not a valid torch device"):
        RewardScorer.from_config(RewardConfig(model_name_or_path=str(reversed_classifier), device="gpu-please"))
    scorer = RewardScorer.from_config(
        RewardConfig(model_name_or_path=str(reversed_classifier), device="cpu", dtype="bfloat16")
    )
    assert next(scorer.model.parameters()).dtype == torch.bfloat16
    assert scorer.score(TEXTS[:2]).rewards.dtype == torch.float32


def test_make_reward_fn_picks_in_process_or_server(reversed_classifier, monkeypatch):
    cfg = RewardConfig(model_name_or_path=str(reversed_classifier), device="cpu", text="summary")
    local = make_reward_fn(cfg)
    assert isinstance(local.backend, RewardScorer) and local.where == "in-process on cpu"
    scores = local(["ignored prompt "], ["You are a kind friend."])
    torch.testing.assert_close(scores.rewards, local.score_texts(["You are a kind friend."]).rewards)

    monkeypatch.setenv("MY_REWARD_TOKEN", "s3cret")
    remote = make_reward_fn(RewardConfig(url="http://127.0.0.1:9/", token_env="MY_REWARD_TOKEN"))
    assert isinstance(remote.backend, RewardClient)
    assert remote.backend._http.headers["authorization"] == "Bearer s3cret"
    assert remote.where == "server http://127.0.0.1:9/"
    remote.close()
    with pytest.raises(RewardError, match="reward.text"):
        make_reward_fn(RewardConfig(url="http://127.0.0.1:9", text="everything"))


def scoring_transport(handler_log: list, statuses: list[int], payload=None, server_limit: int = 256):
    """An httpx transport answering /score with the given statuses in turn, then 200 with one score per text; /health
    reports `server_limit` texts per request."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200, json={"status": "ok", "max_texts_per_request": server_limit})
        texts = json.loads(request.content)["texts"]
        handler_log.append(texts)
        if statuses:
            status = statuses.pop(0)
            return httpx.Response(status, json={"detail": f"status {status} from the fake server"})
        body = payload(texts) if payload else {
            "rewards": [float(len(t)) for t in texts], "toxicity": [0.5] * len(texts),
            "logits": [[float(len(t)), 0.0] for t in texts],
        }
        # json.dumps (unlike httpx's json=) writes NaN, as a broken server might.
        return httpx.Response(200, content=json.dumps(body).encode(), headers={"content-type": "application/json"})

    return httpx.MockTransport(handler)


def test_client_retries_5xx_and_503_then_succeeds():
    calls: list = []
    client = RewardClient("http://reward", max_retries=3, backoff_s=0.01, transport=scoring_transport(calls, [503, 500]))
    scores = client.score(["ab", "abcd"])
    assert scores.rewards.tolist() == [2.0, 4.0] and len(calls) == 3


def test_client_does_not_retry_4xx_and_shows_the_server_message():
    calls: list = []
    client = RewardClient("http://reward", max_retries=3, backoff_s=0.01, transport=scoring_transport(calls, [413]))
    with pytest.raises(RewardError, match="HTTP 413: status 413 from the fake server"):
        client.score(["x"])
    assert len(calls) == 1


def test_client_gives_up_after_its_retry_budget():
    calls: list = []
    client = RewardClient("http://reward", max_retries=2, backoff_s=0.05, transport=scoring_transport(calls, [503] * 5))
    started = time.monotonic()
    with pytest.raises(RewardError, match=r"did not answer after 3 attempts \(HTTP 503.*rewards\.server` running"):
        client.score(["x"])
    assert len(calls) == 3
    assert total_backoff_s(2, 0.05) <= time.monotonic() - started < total_backoff_s(2, 0.05) + 2.0


def test_client_rejects_answers_without_one_reward_per_text():
    short = lambda texts: {"rewards": [1.0] * (len(texts) - 1), "toxicity": [0.1] * len(texts), "logits": [[1.0, 0.0]] * len(texts)}
    client = RewardClient("http://reward", transport=scoring_transport([], [], short))
    with pytest.raises(RewardError, match="expected exactly one score per text"):
        client.score(["a", "b", "c"])
    nan = lambda texts: {"rewards": [float("nan")] * len(texts), "toxicity": [0.1] * len(texts), "logits": [[1.0, 0.0]] * len(texts)}
    with pytest.raises(RewardError, match="non-finite"):
        RewardClient("http://reward", transport=scoring_transport([], [], nan)).score(["a"])
    with pytest.raises(RewardError, match="malformed"):
        RewardClient("http://reward", transport=scoring_transport([], [], lambda t: {"scores": []})).score(["a"])
    with pytest.raises(RewardError, match="empty"):
        RewardClient("http://reward").score([])


def test_client_splits_large_batches_and_keeps_order():
    calls: list = []
    client = RewardClient("http://reward", max_texts_per_request=3, transport=scoring_transport(calls, []))
    texts = ["a" * n for n in range(1, 9)]
    assert client.score(texts).rewards.tolist() == [float(n) for n in range(1, 9)]
    assert [len(c) for c in calls] == [3, 3, 2]
    calls.clear()  # no cap: the server's limit, asked once
    client = RewardClient("http://reward", transport=scoring_transport(calls, [], server_limit=5))
    assert len(client.score(texts)) == 8 and len(client.score(texts[:6])) == 6
    assert [len(c) for c in calls] == [5, 3, 5, 1]
    client = RewardClient("http://reward", max_texts_per_request=9, transport=scoring_transport(calls, [], server_limit=4))
    assert client.max_texts_per_request == 4  # a cap never raises the server's limit
    old_server = httpx.MockTransport(lambda request: httpx.Response(200, json={"status": "ok"}))
    with pytest.raises(RewardError, match="does not report max_texts_per_request"):
        RewardClient("http://reward", transport=old_server).score(["a"])


def test_over_long_texts_keep_their_end_so_the_summary_is_always_scored(tiny_artifacts):
    """Texts longer than the classifier's limit lose their beginning: two texts with different prompts but the same
    (long) ending score identically, because only the ending fits in the window."""
    scorer = RewardScorer.from_config(RewardConfig(model_name_or_path=str(tiny_artifacts.roberta), device="cpu"))
    ending = "You are a stupid useless idiot and a pathetic liar. " * 40
    assert len(scorer.tokenizer(ending)["input_ids"]) > scorer.max_length
    a, b = scorer.score_pairs(["#Person1#: Hello there. " * 30, "A completely different prompt about jackets. " * 30],
                              [ending, ending], "prompt_and_summary").logits
    torch.testing.assert_close(a, b)
    short_a, short_b = scorer.score_pairs(["#Person1#: Hello there. ", "A different prompt about jackets. "],
                                          ["They talk.", "They talk."], "prompt_and_summary").logits
    assert not torch.allclose(short_a, short_b)  # prompts that fit do change the score


def test_hub_ids_are_told_from_local_paths_in_one_place():
    from rewards.sources import is_hub_id

    for name in ("google/flan-t5-base", "facebook/roberta-hate-speech-dynabench-r4-target", "t5-small", "a_b/c.d-e"):
        assert is_hub_id(name), name
    for name in ("./model", "/abs/dir", "~/m", "a/b/c", "../x", ".hidden/x", "owner/.x", "", "a b/c"):
        assert not is_hub_id(name), name
    assert is_hub_id("knkarthick/dialogsum", require_owner=True) and not is_hub_id("dialogsum", require_owner=True)
