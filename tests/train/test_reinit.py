"""reinit_weights: the model class's own seeded initialisation instead of the folder's weights, on the way
into training; and a pretraining run that trains exactly max_steps steps, past the end of its data."""
import json
import random

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tests.helpers import tiny_run, tokenize_with_model, write_jsonl
from tunedag.config import ConfigError, parse_config
from tunedag.data.download import download_dataset
from tunedag.data.shards import ShardReader
from tunedag.models.loading import load_causal_lm
from tunedag.train.engines import TorchEngine
from tunedag.train.fsdp_engine import FSDPEngine
from tunedag.train.loop import steps_per_epoch, train
from tunedag.train.ranks import DistEnv
from tests.train.ranks import free_port


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_reinit_is_the_classs_own_seeded_init_not_the_folders_weights(tiny_model_dir):
    loaded = load_causal_lm(tiny_model_dir)
    torch.manual_seed(123)
    before = torch.rand(3)
    fresh = load_causal_lm(tiny_model_dir, reinit_seed=7)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), before)  # the caller's RNG is left as it was
    torch.manual_seed(7)
    reference = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir), dtype=torch.float32)
    assert list(fresh.state_dict()) == list(loaded.state_dict())
    assert _same(fresh, reference)
    assert _same(fresh, load_causal_lm(tiny_model_dir, reinit_seed=7))
    assert not _same(fresh, load_causal_lm(tiny_model_dir, reinit_seed=8))
    differ = [k for k, v in fresh.state_dict().items() if not torch.equal(v, loaded.state_dict()[k])]
    assert "model.embed_tokens.weight" in differ and "lm_head.weight" in differ


def test_the_torch_engine_trains_from_the_fresh_init(tiny_model_dir, tmp_path):
    run = tiny_run(write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"}] * 4),
                   adapter=None, reinit_weights=True, seed=5)
    engine = TorchEngine(run, tiny_model_dir, torch.device("cpu"))
    assert _same(engine.model, load_causal_lm(tiny_model_dir, reinit_seed=5))


def test_fsdp_shards_hold_the_fresh_init(tiny_model_dir, tmp_path):
    """One rank of FSDP2 (gloo): every parameter's shards, gathered, are the fresh init's."""
    run = tiny_run(write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"}] * 4),
                   adapter=None, reinit_weights=True, seed=5, train_engine="fsdp")
    engine = FSDPEngine(run, tiny_model_dir, DistEnv(master_port=free_port()), torch.device("cpu"))
    try:
        fresh = dict(load_causal_lm(tiny_model_dir, reinit_seed=5).named_parameters())
        params = dict(engine.model.named_parameters())
        assert params.keys() == fresh.keys()
        for name, param in params.items():
            assert torch.equal(param.full_tensor(), fresh[name]), name
    finally:
        torch.distributed.destroy_process_group()


def test_reinit_weights_needs_a_full_fine_tune(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(ConfigError, match=r"reinit_weights: .*use adapter: null"):
        tiny_run(src, adapter="lora", reinit_weights=True)


def test_a_pretraining_run_trains_max_steps_past_the_end_of_its_data(tiny_model_dir, tmp_path):
    rng = random.Random(0)
    words = "one two three four five six seven eight nine ten".split()
    write_jsonl(tmp_path / "corpus" / "train.jsonl",
                [{"text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 20)))} for _ in range(10)])
    raw = {"base_model": "builtin:tiny-llama", "pretraining_dataset": [{"path": str(tmp_path / "corpus")}],
           "reinit_weights": True, "max_steps": 10, "micro_batch_size": 4, "sequence_len": 32, "val_set_size": 2,
           "learning_rate": 1e-3, "save_steps": 100}
    run = parse_config({"runs": {"r": raw}}, base_dir=tmp_path).runs["r"]
    assert run.adapter is None and run.reinit_weights
    download_dataset(run.datasets[0], tmp_path / "raw")
    tokenize_with_model(run, [tmp_path / "raw"], tiny_model_dir, tmp_path / "packed")
    rows = len(ShardReader(tmp_path / "packed" / "train"))
    assert steps_per_epoch(run, rows) < 10  # the corpus ends before the words bound: fewer rows than 10 steps read
    info = train(run, tmp_path / "packed", tiny_model_dir, tmp_path / "run")
    lines = [json.loads(l) for l in (tmp_path / "run" / "train_metrics.jsonl").read_text().splitlines()]
    assert info["steps"] == 10 and [l["step"] for l in lines] == list(range(1, 11))
    assert lines[-1]["epoch"] >= 1  # the data started over to reach max_steps
