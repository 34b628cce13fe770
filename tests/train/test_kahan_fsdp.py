"""master_weights: bf16_kahan on FSDP2 shards (2 CPU ranks, gloo): bf16 weights with rows split unevenly
(67 over 2 ranks), each rank compensating its own rows; the same weights and compensation as one process,
and a resume through each rank's torch.distributed.checkpoint shards that ends bit for bit where the
uninterrupted run does."""
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.train.test_optimizers_fsdp import Tiny, train
from tunedag.train.kahan_adamw import COMPENSATION
from tunedag.train.optimizers import build_optimizer

STEPS, MORE = 3, 2


def model_and_optimizer(mesh=None):
    torch.manual_seed(0)
    model = Tiny().bfloat16()
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for layer in (model.proj, model.up):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = build_optimizer(list(model.parameters()), "adamw_torch_8bit", lr=1e-3, weight_decay=0.1,
                          master_weights="bf16_kahan")
    return model, opt


def worker(rank: int, folder: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    full, shards = StateDictOptions(full_state_dict=True, cpu_offload=True), StateDictOptions()

    def sharded_state(model, opt):
        return {"model": get_model_state_dict(model, options=shards),
                "optimizer": get_optimizer_state_dict(model, opt, options=shards)}

    model, opt = model_and_optimizer(mesh)
    train(model, opt, range(STEPS))
    gathered = {"weights": get_model_state_dict(model, options=full),
                "state": get_optimizer_state_dict(model, opt, options=full)}
    dcp.save(sharded_state(model, opt), checkpoint_id=f"{folder}/dcp")
    resumed, resumed_opt = model_and_optimizer(mesh)
    state = sharded_state(resumed, resumed_opt)
    dcp.load(state, checkpoint_id=f"{folder}/dcp")
    set_model_state_dict(resumed, state["model"], options=shards)
    set_optimizer_state_dict(resumed, resumed_opt, state["optimizer"], options=shards)
    for m, o in ((model, opt), (resumed, resumed_opt)):
        train(m, o, range(STEPS, STEPS + MORE))
    finals = [get_model_state_dict(m, options=full) for m in (model, resumed)]
    if rank == 0:
        torch.save({**gathered, "final": finals[0], "resumed": finals[1]}, f"{folder}/rank0.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fsdp_kahan")
    mp.spawn(worker, args=(str(folder),), nprocs=2, join=True)
    return torch.load(folder / "rank0.pt")


def test_fsdp2_shards_compensate_and_resume_like_one_process(two_ranks):
    model, opt = model_and_optimizer()
    train(model, opt, range(STEPS))
    names = {id(p): n for n, p in model.named_parameters()}
    for key, value in model.state_dict().items():
        assert two_ranks["weights"][key].dtype == torch.bfloat16
        torch.testing.assert_close(two_ranks["weights"][key], value)  # bf16's tolerance
    for param, state in opt.state.items():
        theirs = two_ranks["state"]["state"][names[id(param)]][COMPENSATION]
        # the compensations are the residuals below half a bf16 step of these weights: compared at that scale
        assert state[COMPENSATION].abs().sum() > 0
        torch.testing.assert_close(theirs, state[COMPENSATION], rtol=0,
                                   atol=float(param.detach().abs().max()) * 2 ** -9)
    for key, value in two_ranks["final"].items():
        assert torch.equal(two_ranks["resumed"][key], value), key
