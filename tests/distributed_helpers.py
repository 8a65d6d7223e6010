"""Two gloo processes on CPU: the wrappers under test and a spawn that survives gloo's teardown."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2


def ddp(model):
    return torch.nn.parallel.DistributedDataParallel(model)


def fsdp2(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    fully_shard(model, mesh=init_device_mesh("cpu", (WORLD_SIZE,)))
    return model


WRAPPERS = {"ddp": ddp, "fsdp2": fsdp2}


def full_grads(model):
    """Every parameter's gradient, whole (FSDP2 shards them), by name without DDP's prefix."""
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad
        grads[name.removeprefix("module.")] = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
    return grads


def _run_rank(rank, worker, init_file, args):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        worker(rank, *args)
        dist.barrier()  # no rank tears gloo down while the other still talks to it (an abort under load)
    finally:
        dist.destroy_process_group()


def spawn(worker, args, tmp_path, saved_files):
    """Run ``worker(rank, *args)`` on every rank; ``saved_files`` are what the ranks write."""
    try:
        mp.spawn(_run_rank, args=(worker, str(tmp_path / "init"), args), nprocs=WORLD_SIZE, join=True)
    except mp.ProcessExitedException:
        # gloo sometimes aborts in its own teardown on a loaded machine ("terminate called without an
        # active exception"), after every rank has saved its results: those are what the tests check.
        if not all(path.is_file() for path in saved_files):
            raise
