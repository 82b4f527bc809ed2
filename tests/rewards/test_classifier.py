"""rewards/classifier.py: the device the reward model runs on, and the refusal of a checkpoint whose classification
head would be initialised at random."""

import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig

from rewards.classifier import load_reward_classifier, resolve_device
from rewards.config import RewardConfig
from rewards.errors import RewardError
from rewards.scorer import RewardScorer
from helpers import REPO_ROOT, free_port


def test_reward_device_auto_is_this_process_s_own_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == torch.device("cuda:3")
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device("auto") == torch.device("cuda:0")  # one process, no launcher
    assert resolve_device("cuda:1") == torch.device("cuda:1")  # explicit devices are kept
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda:0")  # the launcher gave this process one GPU of its own
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


# ----------------------------------------------------------------------------------------------------
# A checkpoint without a trained classification head


def _base_encoder(classifier, out_dir, keep_labels=False):
    """The encoder of the tiny `classifier` without its head (a RobertaModel) and its tokenizer, saved like a hub base
    checkpoint."""
    from transformers import AutoTokenizer, RobertaConfig, RobertaModel

    config = RobertaConfig.from_pretrained(classifier)
    if not keep_labels:  # what a base encoder's config carries: transformers' LABEL_0/LABEL_1 defaults
        del config.id2label, config.label2id
        config.num_labels = 2
    torch.manual_seed(0)
    RobertaModel(config).save_pretrained(out_dir / "base")
    AutoTokenizer.from_pretrained(classifier).save_pretrained(out_dir / "base")
    return out_dir / "base"


@pytest.mark.parametrize("labels", ["defaults", "named"])
def test_a_checkpoint_without_its_classification_head_is_refused(reversed_classifier, tmp_path, labels):
    base = _base_encoder(reversed_classifier, tmp_path, keep_labels=labels == "named")
    # LABEL_0/LABEL_1 are what the old label error suggested for a base encoder: they must not get past the head check.
    reward_label, toxic_label = ("LABEL_0", "LABEL_1") if labels == "defaults" else ("nothate", "hate")
    assert reward_label in AutoConfig.from_pretrained(base).id2label.values()
    cfg = RewardConfig(model_name_or_path=str(base), device="cpu", reward_label=reward_label, toxic_label=toxic_label)
    with pytest.raises(RewardError) as caught:
        load_reward_classifier(cfg)
    message = str(caught.value)
    assert str(base) in message and "has no trained classification head" in message
    assert "classifier.out_proj.weight" in message and "RobertaModel" in message
    assert "LABEL_" not in message and "\n" not in message
    with pytest.raises(RewardError, match="has no trained classification head"):
        RewardScorer.from_config(cfg)


def test_a_real_classifier_still_loads(reversed_classifier):
    model, _tokenizer = load_reward_classifier(RewardConfig(model_name_or_path=str(reversed_classifier), device="cpu"))
    assert model.config.id2label == {0: "hate", 1: "nothate"}


def test_server_cli_refuses_a_base_encoder_in_one_line(reversed_classifier, tmp_path):
    base = _base_encoder(reversed_classifier, tmp_path)
    done = subprocess.run([sys.executable, "-m", "rewards.server", "--reward.model_name_or_path", str(base),
                           "--reward.device", "cpu", "--reward.reward_label", "LABEL_0", "--reward.toxic_label", "LABEL_1",
                           "--reward_server.port", str(free_port())],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    # The last line is the error, and the only one from the server (the rest is the weights' progress bar).
    lines = [line for line in done.stderr.strip().splitlines() if "Loading weights" not in line]
    assert len(lines) == 1 and lines[0].startswith("rewards.server: error:"), done.stderr
    assert "has no trained classification head" in lines[0] and "LABEL_" not in lines[0]


def test_a_classifier_missing_encoder_weights_is_refused(reversed_classifier, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    incomplete = tmp_path / "incomplete"
    shutil.copytree(reversed_classifier, incomplete)
    weights = load_file(incomplete / "model.safetensors")
    del weights["roberta.embeddings.LayerNorm.weight"]
    save_file(weights, incomplete / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RewardError, match=r"lacks 1 weight\(s\) of its encoder \(roberta.embeddings.LayerNorm.weight\)"):
        load_reward_classifier(RewardConfig(model_name_or_path=str(incomplete), device="cpu"))


def test_uncached_reward_model_hub_id_without_a_hub_fails_at_once_in_one_line(unreachable_hub):
    import time

    start = time.monotonic()
    with pytest.raises(RewardError) as err:
        load_reward_classifier(RewardConfig(model_name_or_path="someone/not-cached", device="cpu"))
    assert str(err.value).startswith(
        f"reward model 'someone/not-cached' is neither a local directory nor in the Hugging Face cache "
        f"({unreachable_hub.hub_cache}), and the hub cannot be reached (http://127.0.0.1:9:")
    assert "\n" not in str(err.value) and time.monotonic() - start < 10  # the libraries' retries take a minute
