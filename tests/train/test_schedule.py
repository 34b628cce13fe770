"""The learning-rate schedule (tunedag.train.schedule) point by point against hand-computed curves,
transformers' schedules where they coincide, its resume, and the config checks of its keys."""
import math

import pytest
import torch
from transformers import get_scheduler

from tunedag.config import ConfigError
from tunedag.train.schedule import ScheduleError, build_scheduler
from tests.helpers import tiny_run, write_jsonl


def lrs(scheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps + 1):
        out.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_cosine_with_a_floor_held_after_a_share_of_the_steps():
    """10 steps, 2 warmup, floor 0.1 reached at int(10 * 0.6) = 6, then held: by hand,
    step s in 2..6: 0.1 + 0.9 * (1 + cos(pi * (s - 2) / 4)) / 2."""
    by_hand = [0.0, 0.5, 1.0,
               0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2, 0.55, 0.1 + 0.9 * (1 + math.cos(3 * math.pi / 4)) / 2,
               0.1, 0.1, 0.1, 0.1, 0.1]
    got = lrs(build_scheduler(optimizer(2.0), "cosine", 2, 10, min_lr_ratio=0.1, constant_lr_ratio=0.6), 10)
    assert got == pytest.approx([2.0 * f for f in by_hand], abs=1e-12)


def test_cosine_min_lr_ratio_alone_reaches_its_floor_at_the_last_step():
    """8 steps, 0 warmup, floor 0.25: 0.25 + 0.75 * (1 + cos(pi * s / 8)) / 2; 1.0 is a constant lr
    after the warmup (Axolotl's examples/llama-3/3b-qat-*.yaml)."""
    by_hand = [0.25 + 0.75 * (1 + math.cos(math.pi * s / 8)) / 2 for s in range(9)]
    assert lrs(build_scheduler(optimizer(), "cosine", 0, 8, min_lr_ratio=0.25), 8) == pytest.approx(by_hand, abs=1e-12)
    flat = lrs(build_scheduler(optimizer(), "cosine", 3, 8, min_lr_ratio=1.0, constant_lr_ratio=0), 8)
    assert flat == pytest.approx([0, 1 / 3, 2 / 3, 1, 1, 1, 1, 1, 1], abs=1e-12)


@pytest.mark.parametrize("ours, theirs", [("cosine", "cosine"), ("linear", "linear"),
                                          ("constant", "constant_with_warmup")])
def test_without_the_new_keys_the_schedules_are_transformers(ours, theirs):
    expected = lrs(get_scheduler(theirs, optimizer(), num_warmup_steps=3, num_training_steps=13), 13)
    assert lrs(build_scheduler(optimizer(), ours, 3, 13), 13) == pytest.approx(expected, abs=1e-12)


def test_a_resumed_schedule_continues_where_it_stopped():
    whole = lrs(build_scheduler(optimizer(), "cosine", 2, 12, 0.2, 0.5), 12)
    first = build_scheduler(optimizer(), "cosine", 2, 12, 0.2, 0.5)
    lrs(first, 4)  # 5 steps taken
    second = build_scheduler(optimizer(), "cosine", 2, 12, 0.2, 0.5)
    second.load_state_dict(first.state_dict())
    assert lrs(second, 7) == pytest.approx(whole[5:], abs=1e-12)


def test_a_cosine_that_would_end_inside_the_warmup_is_refused():
    with pytest.raises(ScheduleError, match=r"cosine_constant_lr_ratio: 0.1 of 50 steps ends the cosine at step 5"):
        build_scheduler(optimizer(), "cosine", 10, 50, min_lr_ratio=0.1, constant_lr_ratio=0.1)


@pytest.fixture
def rows(tmp_path):
    return write_jsonl(tmp_path / "rows.jsonl", [{"instruction": "a", "output": "b"}])


@pytest.mark.parametrize("keys, problem", [
    ({"cosine_min_lr_ratio": 1.5}, r"cosine_min_lr_ratio: must be in \[0, 1\], got 1.5"),
    ({"cosine_min_lr_ratio": 0.1, "lr_scheduler": "linear"}, "cosine_min_lr_ratio: shapes lr_scheduler: cosine"),
    ({"cosine_constant_lr_ratio": 0.8}, "cosine_constant_lr_ratio: holds the cosine's floor"),
    ({"optimizer": "muon", "train_engine": "deepspeed"}, "optimizer: muon orthogonalises whole weight matrices"),
])
def test_config_checks_name_the_key(keys, problem, rows):
    with pytest.raises(ConfigError, match=r"runs\.t\." + problem):
        tiny_run(rows, **keys)


def test_axolotl_examples_values_are_accepted(rows):
    run = tiny_run(rows, cosine_min_lr_ratio=1.0, cosine_constant_lr_ratio=0)
    assert (run.cosine_min_lr_ratio, run.cosine_constant_lr_ratio) == (1.0, 0)
