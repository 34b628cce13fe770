"""The model's embeddings grown to the run's tokenizer (tokens added by special_tokens / tokens).

A new token's rows, in the input embeddings and in the LM head, start at the mean of the existing
rows (Hewitt's vocabulary-expansion advice, which transformers' mean_resizing samples around): its
logit starts at the average one, so adding it barely moves the model's predictions. The mean is
deterministic, so every engine and rank starts from the same rows, and the merge stage rebuilds
exactly the rows an adapter run left untrained from the base weights (:func:`grow_rows`).
"""
from __future__ import annotations

import contextlib

import torch
from transformers import PreTrainedModel


# Once the vocabulary grew, PEFT's save_pretrained (save_embedding_layers="auto") also writes the whole
# embedding matrices beside an adapter, lora_modules_to_save ones twice more under wrapper names. The
# adapter needs none of them: trained rows are in lora_modules_to_save, untrained ones are the mean
# rows the merge rebuilds from the base. Every adapter save passes these.
ADAPTER_SAVE = {"save_embedding_layers": False, "safe_serialization": True}


def grow_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` (n, d) followed by ``rows - n`` copies of its mean row (summed in fp32)."""
    n = weight.shape[0]
    if rows <= n:
        return weight
    mean = weight.float().mean(0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(rows - n, *weight.shape[1:])])


def _gathered(params: list[torch.nn.Parameter]):
    """Whole parameters to write into: gathered and re-partitioned by DeepSpeed ZeRO-3, else as they are."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


@torch.no_grad()
def resize_vocab_(model: PreTrainedModel, vocab_size: int | None) -> int:
    """Grow ``model``'s input embeddings and LM head (a reward model: the embeddings) to ``vocab_size``
    rows, new rows the mean of the old; never shrink. Returns the number of rows added."""
    old = model.get_input_embeddings().num_embeddings
    if vocab_size is None or vocab_size <= old:
        return 0
    with torch.random.fork_rng(devices=[]):  # transformers draws the new rows, which are replaced below
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
    modules = [model.get_input_embeddings(), model.get_output_embeddings()]
    params = list({id(m.weight): m.weight for m in modules if m is not None}.values())
    with _gathered(params):
        for weight in params:
            weight[old:] = weight[:old].float().mean(0).to(weight.dtype)
    return vocab_size - old
