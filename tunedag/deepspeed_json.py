"""The DeepSpeed JSON of ``train_engine: deepspeed``: generated from config.yaml, or the user's own
checked against it (torch-free: config validation reads it before any job starts).

``deepspeed_config: path.json`` replaces the generated JSON by the user's, into which tunedag
writes the keys it owns (:data:`OWNED`): a user value for one of them must equal config.yaml's
(or be ``"auto"``), else the run stops naming both. Sections tunedag supplies itself
(:data:`REFUSED`) are refused.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tunedag.errors import TunedagError


log = logging.getLogger(__name__)


class DeepSpeedConfigError(TunedagError, ValueError):
    """The user's DeepSpeed JSON is missing, malformed or contradicts config.yaml."""


# DeepSpeed key -> the config.yaml key that sets it
OWNED = {
    "train_micro_batch_size_per_gpu": "micro_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "train_batch_size": "micro_batch_size x gradient_accumulation_steps x ranks",
    "gradient_clipping": "max_grad_norm",
    "managed_gradient_accumulation": "nothing: tunedag's loop decides when a step ends",
}
# sections the user JSON may not hold, and why
REFUSED = {
    "optimizer": "the optimizer is AdamW from learning_rate and weight_decay",
    "scheduler": "the schedule comes from lr_scheduler and warmup_steps",
    "fp16": "use bf16 (on by default on CUDA); fp16 loss scaling is not supported",
}


def owned_values(micro_batch_size: int, gradient_accumulation_steps: int, max_grad_norm: float,
                 world_size: int | None) -> dict[str, Any]:
    """The DeepSpeed keys tunedag sets from config.yaml (train_batch_size only once ranks are known)."""
    values = {"train_micro_batch_size_per_gpu": micro_batch_size,
              "gradient_accumulation_steps": gradient_accumulation_steps,
              "gradient_clipping": max_grad_norm,
              "managed_gradient_accumulation": False}
    if world_size is not None:
        values["train_batch_size"] = micro_batch_size * gradient_accumulation_steps * world_size
    return values


def read_user_config(path: str | Path) -> dict[str, Any]:
    """The user's DeepSpeed JSON as a mapping; DeepSpeedConfigError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DeepSpeedConfigError(f"DeepSpeed config file not found: {str(path)!r}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DeepSpeedConfigError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise DeepSpeedConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def check_user_config(user: dict[str, Any], owned: dict[str, Any], source: str) -> None:
    """Refuse a user JSON that contradicts config.yaml or holds what tunedag supplies itself."""
    for key, why in REFUSED.items():
        off = key == "fp16" and isinstance(user[key] if key in user else None, dict) and (
            user[key].get("enabled") in (None, False, "auto"))  # "auto": on only where the trainer's fp16 is
        if key in user and not off:
            raise DeepSpeedConfigError(f"{source}: remove {key!r}: {why}")
    for key, value in owned.items():
        if key in user and user[key] != "auto" and user[key] != value:
            raise DeepSpeedConfigError(f"{source}: {key} is {user[key]!r} but config.yaml gives {value!r}; "
                                       f"it is set from {OWNED[key]} (leave it out or write \"auto\")")
    zero = user.get("zero_optimization")
    stage = zero.get("stage") if isinstance(zero, dict) else None
    if stage not in (1, 2, 3):
        raise DeepSpeedConfigError(f"{source}: zero_optimization.stage must be 1, 2 or 3, got {stage!r}")


# zero_optimization keys stock JSONs (Axolotl's deepspeed_configs/, HF's) leave "auto", filled in from the
# model's hidden size as the HF Trainer fills them
AUTO_FROM_HIDDEN = {"reduce_bucket_size": lambda h: h * h, "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
                    "stage3_param_persistence_threshold": lambda h: 10 * h}


def resolve_auto(user: dict[str, Any], hidden_size: int, cuda: bool) -> dict[str, Any]:
    """The user's JSON with its precision and bucket-size ``"auto"`` values filled in: bf16 on CUDA, fp16
    off (tunedag does not train in fp16), buckets from ``hidden_size``. Owned keys are set by the caller.

    ZeRO-1's ``overlap_comm`` is switched off: DeepSpeed overlaps stage 1's gradient reduction with
    backward only when it decides where an optimizer step ends, and tunedag's loop decides that
    (``managed_gradient_accumulation: false``). The reduction is the same, only not overlapped."""
    config = dict(user)
    config.pop("fp16", None)  # check_user_config let it through only switched off or "auto"
    bf16 = dict(config.get("bf16") or {"enabled": cuda})
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = cuda
    config["bf16"] = bf16
    zero = dict(config.get("zero_optimization") or {})
    for key, fill in AUTO_FROM_HIDDEN.items():
        if zero.get(key) == "auto":
            zero[key] = fill(hidden_size)
    if zero.get("stage") == 1 and zero.get("overlap_comm"):
        log.info("ZeRO stage 1: overlap_comm off (DeepSpeed overlaps only where it ends optimizer steps itself)")
        zero["overlap_comm"] = False
    config["zero_optimization"] = zero
    return config
