"""Full fine-tuning (adapter: null): every engine against the torch engine, exact resume, unfrozen_parameters,
the optimizers, and the merge stage's HF folder."""
import dataclasses
import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tunedag.config import ConfigError
from tunedag.export.vllm import export_vllm
from tunedag.merge.full import merge_full_model
from tunedag.merge.weights import MergeError
from tunedag.train.checkpoint import list_checkpoints
from tunedag.train.engines import EngineError, TorchEngine, all_reduce_sum
from tunedag.train.loop import train
from tunedag.train.optimizers import OptimizerError, build_optimizer
from tunedag.train.ranks import DistEnv
from tests.helpers import tiny_run
from tests.train.ranks import free_port, metrics, torchrun_train, write_runs

FULL = {"adapter": None, "lora_modules_to_save": [], "learning_rate": 1e-3, "max_grad_norm": 0.5}


def weights(run_dir):
    """The trained model train wrote to run_dir/adapter (an HF folder for a full fine-tune)."""
    found = {}
    for file in sorted((run_dir / "adapter").glob("*.safetensors")):
        found.update(load_file(file))
    return found


def single(src, **over):
    return tiny_run(src, **{**FULL, **over})


@pytest.fixture(scope="module")
def reference(sample_shards, tiny_model_dir, tmp_path_factory):
    """The torch engine, one process: micro-batch 4 x 2 accumulation, 10 steps."""
    src, shards = sample_shards
    run_dir = tmp_path_factory.mktemp("full") / "torch"
    train(single(src, max_steps=10, gradient_accumulation_steps=2), shards, tiny_model_dir, run_dir)
    return run_dir


def test_full_finetune_writes_the_whole_trained_model(reference, tiny_model_dir):
    losses = [m["loss"] for m in metrics(reference)]
    assert losses[-1] < 0.8 * losses[0]
    trained, base = weights(reference), load_file(tiny_model_dir / "model.safetensors")
    assert trained.keys() == base.keys()  # every weight, the frozen-by-nobody ones included
    assert all(not torch.equal(trained[n], base[n]) for n in base)  # and every one trained
    assert json.loads((reference / "adapter/config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


ENGINES = {"ddp": {"train_engine": "ddp"}, "fsdp": {"train_engine": "fsdp"},
           "zero2": {"train_engine": "deepspeed", "deepspeed_zero_stage": 2},
           "zero3": {"train_engine": "deepspeed", "deepspeed_zero_stage": 3}}
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")


@pytest.mark.parametrize("engine", ["ddp", "fsdp", pytest.param("zero2", marks=needs_deepspeed),
                                    pytest.param("zero3", marks=needs_deepspeed)])
def test_two_ranks_match_one_process(engine, reference, sample_shards, tiny_model_dir, tmp_path):
    """2 ranks x micro-batch 2 x 2 accumulation = 1 process x micro-batch 4 x 2: the same rows per step."""
    src, shards = sample_shards
    config = write_runs(tmp_path / "config.yaml", src, {engine: {
        **FULL, **ENGINES[engine], "max_steps": 10, "micro_batch_size": 2, "gradient_accumulation_steps": 2}})
    torchrun_train(config, engine, shards, tiny_model_dir, tmp_path / engine)
    info = json.loads((tmp_path / engine / "train_info.json").read_text())
    assert info["world_size"] == 2 and info.get("zero_init", False) == (engine == "zero3")  # built partitioned
    ranks, one = metrics(tmp_path / engine), metrics(reference)
    # fp32 sums in another order (two ranks, then a reduction): a few ulps of a loss near 5
    assert [m["loss"] for m in ranks] == pytest.approx([m["loss"] for m in one], rel=1e-5)
    assert [m["grad_norm"] for m in ranks] == pytest.approx([m["grad_norm"] for m in one], rel=1e-4)
    a, b = weights(tmp_path / engine), weights(reference)
    assert a.keys() == b.keys()
    for name in b:  # Adam's g/sqrt(v) lets near-zero gradients' rounding move single elements by up to an lr step
        assert float((a[name] - b[name]).norm()) <= 1e-3 * float(b[name].norm()), name


def test_gradient_buckets_put_every_tensor_back_in_place():
    """ddp's all-reduce in buckets of a few elements: each tensor returns to its place and shape (one gloo
    rank: the sum is the tensor itself; the 2-rank test above sums a real model's gradients)."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        tensors = [torch.randn(shape, generator=torch.Generator().manual_seed(i))
                   for i, shape in enumerate([(3, 5), (40,), (2, 2, 2), (1,), (7, 3)])]
        copies = [t.clone() for t in tensors]
        all_reduce_sum(tensors, bucket_numel=20)  # buckets: [15], [40], [8, 1], [21]
        for t, c in zip(tensors, copies):
            assert torch.equal(t, c)
    finally:
        torch.distributed.destroy_process_group()


class Killed(Exception):
    pass


KAHAN = {"optimizer": "adamw_torch_8bit", "master_weights": "bf16_kahan"}


@pytest.mark.parametrize("engine, keys", [("torch", {"optimizer": "adamw_torch"}), ("torch", {"optimizer": "adafactor"}),
                                          ("fsdp", {"optimizer": "adamw_torch"}), ("torch", KAHAN), ("fsdp", KAHAN)],
                         ids=["torch", "torch-adafactor", "fsdp", "torch-bf16_kahan", "fsdp-bf16_kahan"])
def test_killed_run_resumes_to_the_same_weights(engine, keys, sample_shards, tiny_model_dir, tmp_path, monkeypatch):
    """Killed in step 5 after the step-3 checkpoint, then run again: bit-identical weights and losses
    (fsdp: one rank, its sharded torch.distributed.checkpoint folder; bf16_kahan: bf16 weights, the Kahan
    compensation and 8-bit moments in the optimizer state)."""
    src, shards = sample_shards
    run = single(src, train_engine=engine, max_steps=6, save_steps=3, **keys)
    env = DistEnv(master_port=free_port())
    train(run, shards, tiny_model_dir, tmp_path / "straight", env)
    real, calls = TorchEngine.loss_sum, []

    def dies_in_step_5(self, batch):
        calls.append(1)
        if len(calls) == 5:
            raise Killed()
        return real(self, batch)

    monkeypatch.setattr(TorchEngine, "loss_sum", dies_in_step_5)
    with pytest.raises(Killed):
        train(run, shards, tiny_model_dir, tmp_path / "resumed", env)
    assert [p.name for p in list_checkpoints(tmp_path / "resumed/checkpoints")] == ["step-3"]
    if engine == "fsdp":
        assert list((tmp_path / "resumed/checkpoints/step-3/dcp").glob("*.distcp"))
    monkeypatch.setattr(TorchEngine, "loss_sum", real)
    info = train(run, shards, tiny_model_dir, tmp_path / "resumed", env)
    assert info["resumed_from"].endswith("step-3")
    assert metrics(tmp_path / "resumed") == [{**m, **{k: metrics(tmp_path / "resumed")[i][k] for k in
                                              ("tokens_per_s", "elapsed_s")}}
                                             for i, m in enumerate(metrics(tmp_path / "straight"))]
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
        assert keys is not KAHAN or a[name].dtype == torch.bfloat16, name


def test_unfrozen_parameters_train_only_what_they_match(sample_shards, tiny_model_dir, tmp_path):
    src, shards = sample_shards
    run = single(src, max_steps=3, unfrozen_parameters=[r"^model\.layers\.1\.mlp\.", "^lm_head"])
    train(run, shards, tiny_model_dir, tmp_path / "run")
    trained, base = weights(tmp_path / "run"), load_file(tiny_model_dir / "model.safetensors")
    changed = {n for n in base if not torch.equal(trained[n], base[n])}
    assert changed == {"lm_head.weight", *(f"model.layers.1.mlp.{p}_proj.weight" for p in ("gate", "up", "down"))}
    with pytest.raises(EngineError, match=r"match no parameter of this model; its names look like model\.embed"):
        train(dataclasses.replace(run, unfrozen_parameters=["^transformer\\.h\\."]), shards, tiny_model_dir,
              tmp_path / "none")


def test_merge_writes_an_hf_folder_of_the_trained_weights(reference, sample_shards, tiny_model_dir, tmp_path):
    run = single(sample_shards[0], merge_dtype="float32", max_shard_size="300KB")
    report = merge_full_model(run, tiny_model_dir, reference / "adapter", tmp_path / "merged")
    merged = tmp_path / "merged"
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded at max_shard_size
    assert (merged / "tokenizer_config.json").is_file() and (merged / "generation_config.json").is_file()
    assert report["relative_logit_error"] == 0.0
    model = AutoModelForCausalLM.from_pretrained(merged, use_safetensors=True)
    trained = weights(reference)
    state = model.state_dict()
    for name, tensor in trained.items():
        assert torch.equal(state[name], tensor), name
    bf16 = dataclasses.replace(run, merge_dtype="bfloat16")
    merge_full_model(bf16, tiny_model_dir, reference / "adapter", tmp_path / "merged-bf16")
    config = json.loads((tmp_path / "merged-bf16/config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    serve = export_vllm(merged, reference / "adapter", tmp_path / "vllm")  # the merged model only: no adapter
    assert serve["lora"] is None and not (tmp_path / "vllm/adapter").exists()
    assert (tmp_path / "vllm/model/config.json").is_file()
    with pytest.raises(MergeError, match="needs the trained model"):
        merge_full_model(run, tiny_model_dir, tmp_path / "merged-bf16" / "missing", tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_optimizers_by_axolotl_name():
    def one_step(name):
        p = torch.nn.Parameter(torch.ones(4, 6))
        opt = build_optimizer([p], name, lr=0.1, weight_decay=0.0)
        p.grad = torch.full_like(p, 0.5)
        opt.step()
        return opt, p

    for name in ("adamw_torch", "adamw_torch_fused", "adafactor"):
        opt, p = one_step(name)
        assert bool((p < 1).all()), name  # a step against the gradient
    assert one_step("adamw_torch_fused")[0].defaults["fused"] is True
    assert "exp_avg_sq_row" in next(iter(one_step("adafactor")[0].state.values()))  # factored second moment
    if importlib.util.find_spec("bitsandbytes") is None:
        for name in ("adamw_bnb_8bit", "paged_adamw_8bit"):
            with pytest.raises(OptimizerError, match=f"optimizer: {name} needs the bitsandbytes package"):
                one_step(name)


@pytest.mark.parametrize("over, message", [
    ({"rl": "dpo", "datasets": [{"path": "SRC", "type": "dpo"}], "train_engine": "fsdp"},
     "rl: dpo does not run on fsdp"),  # its reference model is not sharded
    ({"unfrozen_parameters": ["model.embed_tokens.weight$[:32000]"]}, "row range"),
    ({"unfrozen_parameters": ["(lm_head"]}, "not a Python regular expression"),
    ({"adapter": "lora", "unfrozen_parameters": ["lm_head"]}, "applies to full fine-tuning"),
    ({"train_engine": "deepspeed", "deepspeed_offload": "optimizer", "optimizer": "adafactor"}, "CPU Adam"),
])
def test_config_refuses_what_full_fine_tuning_cannot_run(over, message, sample_shards):
    src, _ = sample_shards
    if "datasets" in over:
        over = {**over, "datasets": [{"path": str(src), "type": "dpo"}]}
    with pytest.raises(ConfigError, match=message):
        tiny_run(src, **{**FULL, **over})
