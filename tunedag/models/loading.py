"""Where a ``base_model`` lives on disk, how it gets there, and how it is loaded.

``builtin:<name>`` is materialised under models/builtin/<name>/, a hub id is downloaded on the
login node under models/hub/<org>--<name>/ (safetensors, configs and tokenizer only), and a
local folder is used where it is. Weights load from safetensors only; model code from the hub
runs only when the run sets ``trust_remote_code: true``. With ``reinit_weights`` (Axolotl's key, for
pretraining from scratch) the weights are not read: the model class initialises them itself from
config.json, seeded, as ``from_config`` does.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tunedag.config import RunConfig
from tunedag.data.run_tokenizer import prepare_run_tokenizer
from tunedag.errors import TunedagError
from tunedag.io import atomic_path
from tunedag.model_facts import read_model_config
from tunedag.models.mxfp4 import is_mxfp4
from tunedag.models.vocab import resize_vocab_

HUB_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.jinja", "tokenizer*",
                "*.model", "*.txt"]


class ModelSourceError(TunedagError, ValueError):
    """A base model that cannot be found or fetched: names the model and what is missing."""


def model_dir(base_model: str, revision: str | None = None, models_root: str | Path = "models") -> Path:
    """The folder the train/merge/evaluate stages read ``base_model`` from (a hub model's pinned
    ``revision`` gets a folder of its own: models/hub/<org>--<name>@<revision>)."""
    root = Path(models_root)
    if base_model.startswith("builtin:"):
        return root / "builtin" / base_model.removeprefix("builtin:")
    local = Path(base_model)
    if local.is_dir() or base_model.startswith((".", "/")):
        return local
    return root / "hub" / (base_model.replace("/", "--") + (f"@{revision}" if revision else ""))


def fetch_model(base_model: str, dest: str | Path, revision: str | None = None) -> Path:
    """Make ``base_model`` available at ``dest`` (the download_model stage), at the hub ``revision``."""
    dest = Path(dest)
    if base_model.startswith("builtin:"):
        from tunedag.models.builtin import materialize_builtin

        return materialize_builtin(base_model.removeprefix("builtin:"), dest)
    if dest.resolve() == Path(base_model).resolve():
        if not (dest / "config.json").is_file():
            raise ModelSourceError(f"{base_model}: no config.json in this folder")
        return dest
    from huggingface_hub import snapshot_download

    with atomic_path(dest) as tmp:
        try:
            snapshot_download(repo_id=base_model, local_dir=tmp, allow_patterns=HUB_PATTERNS, revision=revision)
        except Exception as err:  # hub errors come in many types; name the model either way
            raise ModelSourceError(f"{base_model}: download from the Hugging Face hub failed: {err}") from err
        if not list(tmp.glob("*.safetensors")):
            raise ModelSourceError(f"{base_model}: the repository has no .safetensors weights "
                                   "(tunedag loads weights from safetensors only)")
    return dest


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    path = Path(path)
    if not path.is_dir():
        raise ModelSourceError(f"{path}: model folder not found (run the download_model stage)")
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_run_tokenizer(path: str | Path, run: RunConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of the model folder at ``path`` with ``run``'s special_tokens and tokens
    (tunedag.data.run_tokenizer): what every stage of the run tokenizes and decodes with."""
    return prepare_run_tokenizer(load_tokenizer(path, run.trust_remote_code), run, str(path))


def run_vocab_size(path: str | Path, run: RunConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> int | None:
    """The embedding rows ``run`` needs at least: its tokenizer's size (None when the run adds no tokens);
    ``tokenizer``: the run's, when the caller has loaded it already."""
    if run.special_tokens is None and not run.tokens:
        return None
    return len(tokenizer if tokenizer is not None else load_run_tokenizer(path, run))


def check_weight_files(path: str | Path) -> None:
    """Stop, naming the file, when a weight file of the model folder at ``path`` is missing, cut short
    or not safetensors. Reads only each file's header: safetensors stores an 8-byte header length,
    a JSON header whose ``data_offsets`` place every tensor, then the data, which must end exactly
    where the file ends."""
    path = Path(path)
    fix = f"delete {path} and run the download_model stage again (or point base_model at a good copy)"
    index = path / "model.safetensors.index.json"
    names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
        sorted(p.name for p in path.glob("*.safetensors"))
    if not names:
        raise ModelSourceError(f"{path}: no .safetensors weights (tunedag loads weights from safetensors only)")
    for name in names:
        weights = path / name
        if not weights.is_file():
            raise ModelSourceError(f"{weights}: missing (listed in {index.name}); {fix}")
        size = weights.stat().st_size
        with open(weights, "rb") as fh:
            head = fh.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            try:
                header = json.loads(fh.read(length)) if 0 < length <= size - 8 else None
            except (json.JSONDecodeError, UnicodeDecodeError):
                header = None
        if not isinstance(header, dict):
            raise ModelSourceError(f"{weights}: not a safetensors file (no readable header); {fix}")
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        if 8 + length + end != size:
            raise ModelSourceError(f"{weights}: {size} bytes where its header places {8 + length + end} "
                                   f"(cut short or overwritten); {fix}")


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                   reinit_seed: int | None = None, vocab_size: int | None = None) -> PreTrainedModel:
    """The causal LM of the folder at ``path``; with ``reinit_seed``, freshly initialised (see fresh_causal_lm);
    its embeddings grown to ``vocab_size`` rows where it has fewer (tokens a run adds: run_vocab_size)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"{path}: no config.json (not a Hugging Face model folder)")
    if reinit_seed is not None:
        model = fresh_causal_lm(path, reinit_seed, dtype, trust_remote_code)
    else:
        check_weight_files(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code, **_dequantized(path))
    resize_vocab_(model, vocab_size)
    return model


def _dequantized(path: Path) -> dict[str, Any]:
    """from_pretrained's keywords that load an MXFP4 checkpoint (gpt-oss) dequantized: LoRA trains, and the
    merge computes, against the dequantized experts (tunedag.models.mxfp4), wherever MXFP4 kernels exist."""
    if not is_mxfp4(read_model_config(path)):
        return {}
    from transformers import Mxfp4Config

    return {"quantization_config": Mxfp4Config(dequantize=True)}


def fresh_causal_lm(path: str | Path, seed: int, dtype: torch.dtype = torch.float32,
                    trust_remote_code: bool = False) -> PreTrainedModel:
    """The causal LM that config.json at ``path`` describes, its weights from the model class's own
    initialisation (``_init_weights``, as ``from_config`` runs it) under ``torch.manual_seed(seed)``; the
    folder's weight files are not read. The global RNG is left as it was, so the same seed gives the same
    weights on every rank and in every process, whatever ran before."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
