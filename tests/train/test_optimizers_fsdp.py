"""adamw_torch_8bit, adamw_torch_4bit and muon on FSDP2 shards (2 CPU ranks, gloo): the same weights
and the same (gathered) optimizer state as one process, and a resume through
``torch.distributed.checkpoint``'s full state dicts, as tunedag's fsdp engine saves and loads them."""
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tunedag.train.optimizers import build_optimizer

STEPS, MORE = 3, 2
NAMES = ("adamw_torch_8bit", "adamw_torch_4bit", "muon")


class Tiny(torch.nn.Module):
    """Rows that split unevenly over 2 ranks (67), matrices over 4096 elements (quantized moments), a
    bias and a norm (fp32 moments), embed_tokens and lm_head (AdamW under muon)."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(50, 96)
        self.proj = torch.nn.Linear(96, 67)
        self.up = torch.nn.Linear(67, 96, bias=False)
        self.norm = torch.nn.LayerNorm(96)
        self.lm_head = torch.nn.Linear(96, 50, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(ids)
        h = h + self.up(torch.tanh(self.proj(h)))
        logits = self.lm_head(self.norm(h))
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def model_and_optimizer(name: str) -> tuple[Tiny, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Tiny()
    return model, build_optimizer(list(model.named_parameters()), name, lr=1e-2, weight_decay=0.1)


def train(model: Tiny, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        ids = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(step))
        model(ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def sharded(name: str) -> tuple[Tiny, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Tiny()
    mesh = init_device_mesh("cpu", (2,))  # on the CPU also where CUDA is present
    for layer in (model.proj, model.up):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, build_optimizer(list(model.named_parameters()), name, lr=1e-2, weight_decay=0.1)


def worker(rank: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    for name in NAMES:
        resume_on_two_ranks(rank, name, f"{folder}/{name}")
    dist.destroy_process_group()


def resume_on_two_ranks(rank: int, name: str, folder: str) -> None:
    """3 steps; then as tunedag's fsdp engine resumes a LoRA run (full state dicts that every rank reads)
    and a full fine-tune (each rank's shards through torch.distributed.checkpoint), 2 more steps each."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)

    full, shards = StateDictOptions(full_state_dict=True, cpu_offload=True), StateDictOptions()
    model, opt = sharded(name)
    train(model, opt, range(STEPS))
    gathered = {"weights": get_model_state_dict(model, options=full),
                "state": get_optimizer_state_dict(model, opt, options=full)}
    Path(folder).mkdir(parents=True, exist_ok=True)
    if rank == 0:
        torch.save(gathered, f"{folder}/full.pt")
    dcp.save({"model": get_model_state_dict(model, options=shards),
              "optimizer": get_optimizer_state_dict(model, opt, options=shards)}, checkpoint_id=f"{folder}/dcp")
    dist.barrier()
    from_full, from_full_opt = sharded(name)
    saved = torch.load(f"{folder}/full.pt", weights_only=True)
    set_model_state_dict(from_full, saved["weights"], options=full)
    set_optimizer_state_dict(from_full, from_full_opt, saved["state"], options=full)
    from_shards, from_shards_opt = sharded(name)
    state = {"model": get_model_state_dict(from_shards, options=shards),
             "optimizer": get_optimizer_state_dict(from_shards, from_shards_opt, options=shards)}
    dcp.load(state, checkpoint_id=f"{folder}/dcp")
    set_model_state_dict(from_shards, state["model"], options=shards)
    set_optimizer_state_dict(from_shards, from_shards_opt, state["optimizer"], options=shards)
    finals = {}
    for key, (m, o) in {"final": (model, opt), "from_full": (from_full, from_full_opt),
                        "from_shards": (from_shards, from_shards_opt)}.items():
        train(m, o, range(STEPS, STEPS + MORE))
        finals[key] = get_model_state_dict(m, options=full)
    if rank == 0:
        torch.save({**gathered, **finals}, f"{folder}/rank0.pt")
    dist.barrier()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """One 2-rank job for every optimizer (starting ranks is the slow part)."""
    folder = tmp_path_factory.mktemp("fsdp_optimizers")
    mp.spawn(worker, args=(str(folder),), nprocs=2, join=True)
    return folder


@pytest.mark.parametrize("name", NAMES)
def test_fsdp2_shards_update_and_resume_like_one_process(name, two_ranks):
    got = torch.load(two_ranks / name / "rank0.pt")
    model, opt = model_and_optimizer(name)
    train(model, opt, range(STEPS))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(got["weights"][key], value, rtol=1e-5, atol=1e-6)
    by_id = {id(p): n for n, p in model.named_parameters()}
    names = [by_id[id(p)] for group in opt.param_groups for p in group["params"]]  # the state dict's order
    one = opt.state_dict()["state"]
    for i, key in enumerate(names):  # the gathered state: the same codes, scales or moments, keyed by name
        assert set(got["state"]["state"][key]) == set(one[i])
        for part, value in one[i].items():
            torch.testing.assert_close(got["state"]["state"][key][part].to(value.dtype), value, rtol=1e-5, atol=1e-6)
    for key, value in got["final"].items():
        assert torch.equal(got["from_full"][key], value) and torch.equal(got["from_shards"][key], value), key
