"""The loss inside real training machinery: DDP (gloo, 2 CPU processes), FSDP2, checkpointing.

Each distributed case trains one step of a tiny MTP head on 2 processes, once with the
inline reference loop and once with compute_mtp_ce_loss, and compares every gradient.
"""

import os

import pytest
import torch
from distributed_helpers import WORLD_SIZE, WRAPPERS, full_grads, spawn
from mtp_reference import reference_mtp_ce_loss
from torch.utils.checkpoint import checkpoint

from weighted_mtp.utils import compute_mtp_ce_loss

BATCH, SEQ, HEADS, VOCAB, HIDDEN = 2, 9, 3, 11, 8


class TinyMTPHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = torch.nn.Linear(HIDDEN, HIDDEN)
        self.heads = torch.nn.Linear(HIDDEN, HEADS * VOCAB)

    def forward(self, hidden):
        return self.heads(torch.tanh(self.trunk(hidden))).view(*hidden.shape[:2], HEADS, VOCAB)


def rank_batch(rank):
    gen = torch.Generator().manual_seed(100 + rank)
    hidden = torch.randn(BATCH, SEQ, HIDDEN, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    labels[:, :2] = -100
    attention_mask = torch.ones(BATCH, SEQ)
    attention_mask[rank % BATCH, SEQ - 2:] = 0
    weights = torch.rand(BATCH, SEQ, generator=gen, dtype=torch.float64)
    return hidden, labels, attention_mask, weights


def loss_of(implementation, logits, labels, attention_mask, weights):
    loss_fn = compute_mtp_ce_loss if implementation == "ours" else reference_mtp_ce_loss
    return loss_fn(logits, labels, attention_mask, weights)["weighted_ce_loss"]


def _train_step(rank, wrap, implementation, out_dir):
    torch.manual_seed(0)  # same initial parameters on every rank
    model = TinyMTPHead().double()
    model = wrap(model)
    hidden, labels, attention_mask, weights = rank_batch(rank)
    loss = loss_of(implementation, model(hidden), labels, attention_mask, weights)
    loss.backward()
    torch.save({"loss": loss.detach(), "grads": full_grads(model)}, os.path.join(out_dir, f"{implementation}-{rank}.pt"))


def _worker(rank, wrapper_name, out_dir):
    for implementation in ("reference", "ours"):
        _train_step(rank, WRAPPERS[wrapper_name], implementation, out_dir)


def _single_process_grads():
    """Gradients of the mean loss over both ranks' batches, computed without any wrapper."""
    torch.manual_seed(0)
    model = TinyMTPHead().double()
    total = sum(loss_of("reference", model(h), y, m, w) for h, y, m, w in map(rank_batch, range(WORLD_SIZE)))
    (total / WORLD_SIZE).backward()
    return {name: param.grad for name, param in model.named_parameters()}


@pytest.mark.parametrize("wrapper_name", ["ddp", "fsdp2"])
def test_distributed_gradients_match_loop(wrapper_name, tmp_path):
    saved = [tmp_path / f"{name}-{rank}.pt" for name in ("reference", "ours") for rank in range(WORLD_SIZE)]
    spawn(_worker, (wrapper_name, str(tmp_path)), tmp_path, saved)
    expected = _single_process_grads()
    for rank in range(WORLD_SIZE):
        ours = torch.load(tmp_path / f"ours-{rank}.pt")
        reference = torch.load(tmp_path / f"reference-{rank}.pt")
        torch.testing.assert_close(ours["loss"], reference["loss"], atol=1e-12, rtol=0)
        assert ours["grads"].keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(ours["grads"][name], reference["grads"][name], atol=1e-12, rtol=0, msg=name)
            torch.testing.assert_close(ours["grads"][name], grad, atol=1e-12, rtol=0, msg=name)


def test_activation_checkpointing_non_reentrant():
    hidden, labels, attention_mask, weights = rank_batch(0)

    def grads(checkpointed):
        torch.manual_seed(0)
        model = TinyMTPHead().double()

        def head_and_loss(h):
            return compute_mtp_ce_loss(model(h), labels, attention_mask, weights)["weighted_ce_loss"]

        loss = checkpoint(head_and_loss, hidden, use_reentrant=False) if checkpointed else head_and_loss(hidden)
        loss.backward()
        return loss.detach(), [param.grad for param in model.parameters()]

    plain_loss, plain = grads(False)
    checkpointed_loss, checkpointed = grads(True)
    torch.testing.assert_close(checkpointed_loss, plain_loss, atol=0, rtol=0)
    for got, want in zip(checkpointed, plain, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
