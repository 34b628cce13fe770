"""keep_sparsity: a pruned (2:4) model stays sparse through full fine-tuning, on one process and on fsdp's
sharded parameters; Axolotl's llmcompressor ConstantPruningModifier recipe becomes it."""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tunedag.config import ConfigError, parse_config
from tunedag.train.loop import train
from tunedag.train.sparsity import KeptSparsity, SparsityError
from tests.helpers import tiny_run
from tests.train.ranks import metrics, torchrun_train, write_runs

PROJECTIONS = r"^(?:.*_proj\.weight)"


def two_of_four(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` with the two smallest of every four consecutive entries zeroed (2:4 sparsity)."""
    groups = weight.reshape(-1, 4)
    keep = groups.abs().topk(2, dim=1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True)
    return (groups * mask).reshape(weight.shape)


@pytest.fixture(scope="module")
def pruned_model(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pruned") / "model"
    shutil.copytree(tiny_model_dir, folder)
    state = load_file(folder / "model.safetensors")
    state = {n: two_of_four(w) if n.endswith("_proj.weight") else w for n, w in state.items()}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_masked_entries_stay_zero_under_adamw_with_weight_decay():
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 7, bias=True)  # 84 weights: not a multiple of the optimizer's blocks
    with torch.no_grad():
        layer.weight.copy_(two_of_four(layer.weight))
    zeros = layer.weight.detach() == 0
    kept = KeptSparsity(layer.named_parameters(), [r"weight$"])
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1)
    before = layer.weight.detach().clone()
    for _ in range(3):
        layer(torch.randn(5, 12)).square().sum().backward()
        kept.mask_gradients()
        assert torch.all(layer.weight.grad[zeros] == 0)  # clipping sees only the entries that train
        opt.step()
        kept.mask_weights()
        opt.zero_grad()
    assert torch.all(layer.weight[zeros] == 0)
    assert torch.all(layer.weight[~zeros] != before[~zeros])  # the others trained
    assert not torch.equal(layer.bias, torch.zeros(7))


def test_a_pattern_that_matches_nothing_trained_is_an_error():
    layer = torch.nn.Linear(4, 4)
    layer.weight.requires_grad_(False)
    with pytest.raises(SparsityError, match="matches no trained parameter"):
        KeptSparsity(layer.named_parameters(), [r"weight$"])


def test_full_finetune_keeps_the_base_models_zeros(sample_shards, pruned_model, tmp_path):
    src, shards = sample_shards
    run = tiny_run(src, adapter=None, lora_modules_to_save=[], learning_rate=1e-3, max_steps=3,
                   keep_sparsity=[PROJECTIONS])
    train(run, shards, pruned_model, tmp_path / "run")
    base, trained = load_file(pruned_model / "model.safetensors"), load_file(tmp_path / "run/adapter/model.safetensors")
    for name, weight in base.items():
        if name.endswith("_proj.weight"):
            assert torch.equal(trained[name] == 0, weight == 0), name  # exactly the base's zeros, no more
        assert not torch.equal(trained[name], weight), name  # and every tensor trained


def test_fsdp_ranks_keep_the_zeros_of_their_shards(sample_shards, pruned_model, tmp_path):
    src, shards = sample_shards
    config = write_runs(tmp_path / "config.yaml", src, {"sparse": {
        "adapter": None, "lora_modules_to_save": [], "train_engine": "fsdp", "max_steps": 2,
        "micro_batch_size": 2, "learning_rate": 1e-3, "keep_sparsity": [PROJECTIONS]}})
    torchrun_train(config, "sparse", shards, pruned_model, tmp_path / "run")
    assert len(metrics(tmp_path / "run")) == 2
    base, trained = load_file(pruned_model / "model.safetensors"), load_file(tmp_path / "run/adapter/model.safetensors")
    for name in (n for n in base if n.endswith("_proj.weight")):
        assert torch.equal(trained[name] == 0, base[name] == 0), name


RECIPE = {"recipe": {"finetuning_stage": {"finetuning_modifiers": {"ConstantPruningModifier": {
    "targets": ["re:.*q_proj.weight", "re:.*down_proj.weight"], "start": 0}}}}, "save_compressed": True}


def axolotl_run(**keys):
    return {"runs": {"r": {"base_model": "builtin:tiny-llama", "datasets": [{"path": "hf:org/data", "type": "alpaca"}],
                           "plugins": ["axolotl.integrations.llm_compressor.LLMCompressorPlugin"], **keys}}}


def test_axolotl_constant_pruning_recipe_becomes_keep_sparsity():
    config = parse_config(axolotl_run(llmcompressor=RECIPE))
    assert config.runs["r"].keep_sparsity == ["^(?:.*q_proj.weight)", "^(?:.*down_proj.weight)"]
    assert config.runs["r"].adapter is None
    assert any("dense safetensors" in n for n in config.notes["r"])


@pytest.mark.parametrize("recipe, error", [
    ({"recipe": {"s": {"m": {"SparseGPTModifier": {"sparsity": 0.5}}}}}, "SparseGPTModifier"),
    ({"recipe": {"s": {"m": {"ConstantPruningModifier": {"targets": ["Linear"]}}}}}, "'re:' targets"),
    ({"recipe": "recipe.yaml"}, "written inline"),
])
def test_other_llmcompressor_recipes_are_refused(recipe, error):
    with pytest.raises(ConfigError, match=error):
        parse_config(axolotl_run(llmcompressor=recipe))


def test_keep_sparsity_needs_a_full_finetune_off_deepspeed():
    with pytest.raises(ConfigError, match="keep_sparsity: applies to full fine-tuning"):
        parse_config(axolotl_run(adapter="lora", keep_sparsity=[PROJECTIONS]))
    with pytest.raises(ConfigError, match="DeepSpeed keeps"):
        parse_config(axolotl_run(keep_sparsity=[PROJECTIONS], train_engine="deepspeed"))
