"""The reward model: a scalar head on the decoder, and the rewards of a packed batch.

The model is the base decoder as transformers' ``<Arch>ForSequenceClassification`` with
``num_labels=1``: the causal LM head is dropped and ``score`` (Linear(hidden, 1, bias=False))
reads the final hidden state of one token. LoRA adapts the decoder as in every other run; peft's
SEQ_CLS task puts ``score`` in ``modules_to_save``, so the head is trained in full and saved with
the adapter. A full fine-tune (``adapter: null``) trains every weight of the decoder and the head, and
saves the whole classifier. The head's initial weights are N(0, initializer_range) drawn from the run's seed alone, so
the evaluate stage can rebuild the untrained model that training started from.

Packed rows: transformers' pooling picks one token per row; here every segment (each chosen and
each rejected sample of a ``type: dpo`` row) gets its own reward, read at the segment's last token
that is not the pad token, which is where ``ForSequenceClassification`` reads an unpadded sequence
(the last token, unless the pad token is also the end-of-turn token that closes it). Only those
S hidden states go through the head.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedModel
from transformers.utils import logging as hf_logging

from tunedag.data.batches import segment_index
from tunedag.models.batch_inputs import model_inputs
from tunedag.models.loading import ModelSourceError, check_weight_files, load_tokenizer
from tunedag.models.logprobs import unwrap_model

log = logging.getLogger(__name__)


def reward_pad_token_id(config, tokenizer) -> int:
    """The pad token a reward model pools around: the config's, else the tokenizer's pad, else its EOS."""
    for candidate in (getattr(config, "pad_token_id", None), tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise ModelSourceError("the model names no pad or end-of-sequence token; a reward model needs one to "
                           "find the last token of a sequence")


def init_score_head_(model: PreTrainedModel, seed: int) -> None:
    """N(0, initializer_range) head weights from ``seed`` alone, drawn in fp32 whatever the model's dtype;
    a bias (a token classifier's head has one) starts at zero."""
    weight = model.score.weight
    std = getattr(model.config, "initializer_range", 0.02)
    fresh = torch.empty(weight.shape, dtype=torch.float32).normal_(0.0, std,
                                                                   generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        weight.copy_(fresh.to(weight.dtype))
        if model.score.bias is not None:
            model.score.bias.zero_()


def load_reward_model(path: str | Path, dtype: torch.dtype, trust_remote_code: bool, seed: int) -> PreTrainedModel:
    """The base decoder as ``<Arch>ForSequenceClassification`` (num_labels=1) with a head seeded by ``seed``."""
    return load_classifier(path, AutoModelForSequenceClassification, 1, dtype, trust_remote_code, seed)


def load_classifier(path: str | Path, auto: type, num_labels: int, dtype: torch.dtype, trust_remote_code: bool,
                    seed: int) -> PreTrainedModel:
    """The base decoder as the ``auto`` class's classifier (its LM head dropped) with a head seeded by ``seed``."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"{path}: no config.json (not a Hugging Face model folder)")
    check_weight_files(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    pad = reward_pad_token_id(config, load_tokenizer(path, trust_remote_code))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report calls lm_head unexpected and score missing: both intended
    try:
        model = auto.from_pretrained(path, num_labels=num_labels, pad_token_id=pad, dtype=dtype, use_safetensors=True,
                                     trust_remote_code=trust_remote_code)
    finally:
        hf_logging.set_verbosity(verbosity)
    init_score_head_(model, seed)
    log.info("%s from %s: lm_head left out, score head initialised from seed %d, pad token %d",
             type(model).__name__, path, seed, pad)
    return model


def classifier_shapes(path: str | Path, auto: type, num_labels: int,
                      trust_remote_code: bool) -> tuple[str, dict[str, tuple[int, ...]]]:
    """(class name, state-dict name → shape) of the base at ``path`` as the ``auto`` class's classifier.

    Built on the meta device: no weights are allocated.
    """
    config = AutoConfig.from_pretrained(path, num_labels=num_labels, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=trust_remote_code)
    return type(model).__name__, {name: tuple(t.shape) for name, t in model.state_dict().items()}


# --------------------------------------------------------------------------- rewards of a packed batch

def last_token_positions(batch: dict[str, torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(S,) flat positions in the (B·T) batch where each segment's reward is read, and the labels (S,).

    The segment's last token that is not ``pad_id``; its first token when all are.
    """
    index, labels = segment_index(batch)
    flat = index.reshape(-1)
    position = torch.arange(flat.numel())
    inside = flat >= 0
    n = labels.shape[0]
    first = torch.full((n,), flat.numel()).scatter_reduce(0, flat[inside], position[inside], "amin")
    usable = inside & (batch["input_ids"].reshape(-1) != pad_id)
    return first.scatter_reduce(0, flat[usable], position[usable], "amax"), labels


def classifier_hidden(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                      device: torch.device) -> tuple[torch.nn.Module, torch.Tensor]:
    """(the classifier under any peft wrapper, its decoder's hidden states (B·T, H)) of a packed batch: the
    reward and process reward heads score rows of these."""
    classifier = unwrap_model(model)
    decoder = getattr(classifier, classifier.base_model_prefix)
    # the mask in the weights' dtype (tunedag.models.logprobs.sequence_logps says why), windowed per layer type
    hidden = decoder(**model_inputs(batch, device, classifier.dtype, classifier.config)).last_hidden_state
    return classifier, hidden.reshape(-1, hidden.shape[-1])


def segment_rewards(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards (S,) float32, labels (S,)) of every segment of a packed batch, in one forward pass."""
    classifier, hidden = classifier_hidden(model, batch, device)
    where, labels = last_token_positions(batch, classifier.config.pad_token_id)
    pooled = hidden[where.to(device)]  # (S, H)
    return classifier.score(pooled).float()[:, 0], labels.to(device)
