"""Run under torchrun with two processes (gloo): the gradients of one step on a LORS model, each process with its
own batch, under DDP and under FSDP (lors_convert.finetuning.shard), against one process computing the mean of both
processes' losses. AdamW hides a gradient's scale, so this checks the gradients themselves, the groups' shared
matrices above all. Prints the largest relative differences; exits non-zero where one exceeds 1e-5."""

import copy
import sys

import torch
from torch import nn

from lors_convert.evaluate import load_student_teacher
from lors_convert.finetuning import freeze_unreached, shard, stacked_layer_paths, step_loss
from lors_convert.runtime import exit_worker, setup_device, world


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every gradient in full (an FSDP gradient is a DTensor holding this process's shard)."""
    full = lambda g: g.full_tensor() if hasattr(g, "full_tensor") else g
    return {name: full(p.grad).clone() for name, p in model.named_parameters() if p.grad is not None}


rank, world_size = world()
setup_device(world_size)
pair = load_student_teacher(sys.argv[1])
paths = stacked_layer_paths(pair.student, pair.meta)
vocab = pair.student.config.vocab_size
batches = [{"input_ids": torch.randint(4, vocab, (3, 17), generator=torch.Generator().manual_seed(r))} for r in (0, 1)]
freeze_unreached(pair.student, pair.teacher, batches[0], paths, "distill")
loss = lambda model, batch: step_loss(model, pair.teacher, batch, paths, "distill")

ddp = copy.deepcopy(pair.student)
wrapper = nn.parallel.DistributedDataParallel(ddp)  # held: a collected wrapper no longer all-reduces the backward
loss(wrapper, batches[rank]).backward()
fsdp = copy.deepcopy(pair.student)
shard(fsdp, paths)
loss(fsdp, batches[rank]).backward()
alone = pair.student
(sum(loss(alone, batch) for batch in batches) / 2).backward()

expected, worst = gradients(alone), {}
for kind, got in (("ddp", gradients(ddp)), ("fsdp", gradients(fsdp))):
    assert set(got) == set(expected), kind
    for name, g in got.items():  # BERT's key biases: the loss ignores a shift common to all keys, so their
        if not name.endswith("attention.self.key.bias"):  # gradients are rounding noise (about 1e-8)
            worst[kind, name] = ((g - expected[name]).norm() / expected[name].norm()).item()
if rank == 0:
    for kind in ("ddp", "fsdp"):
        shared = max(v for (k, n), v in worst.items() if k == kind and n.startswith("lors_shared."))
        overall = max(v for (k, _), v in worst.items() if k == kind)
        print(f"{kind}: largest relative gradient difference {overall:.2e}, shared matrices {shared:.2e}")
exit_worker(int(max(worst.values()) > 1e-5))
