"""Global-batch contrastive loss: 2 ranks with gather-with-grad equal 1 process on the same batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from vlm.models.clip.loss import clip_loss

B, D_IN, D = 8, 6, 4  # global batch, input width, embedding width


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    enc_i, enc_t = torch.nn.Linear(D_IN, D), torch.nn.Linear(D_IN, D)
    x_img, x_txt = torch.randn(B, D_IN), torch.randn(B, D_IN)
    return enc_i, enc_t, x_img, x_txt


def _features(enc_i, enc_t, x_img, x_txt):
    img = torch.nn.functional.normalize(enc_i(x_img), dim=-1)
    txt = torch.nn.functional.normalize(enc_t(x_txt), dim=-1)
    return img, txt


def _single(local_loss: bool):
    enc_i, enc_t, x_img, x_txt = _setup()
    scale = torch.nn.Parameter(torch.tensor([2.5]))
    img, txt = _features(enc_i, enc_t, x_img, x_txt)
    out = clip_loss(img, txt, scale.exp())
    out["loss"].backward()
    grads = [p.grad.clone() for p in (*enc_i.parameters(), *enc_t.parameters(), scale)]
    return out["loss"].item(), grads


def _rank(rank: int, world: int, init_file: str, local_loss: bool, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    enc_i, enc_t, x_img, x_txt = _setup()
    scale = torch.nn.Parameter(torch.tensor([2.5]))
    per = B // world
    sl = slice(rank * per, (rank + 1) * per)
    img, txt = _features(enc_i, enc_t, x_img[sl], x_txt[sl])
    out = clip_loss(img, txt, scale.exp(), rank=rank, world=world, local_loss=local_loss, gather_with_grad=True)
    out["loss"].backward()
    params = [*enc_i.parameters(), *enc_t.parameters(), scale]
    loss = out["loss"].detach().clone()
    dist.all_reduce(loss)
    for p in params:  # what data-parallel training (DDP / DeepSpeed) does: average gradients
        dist.all_reduce(p.grad)
        p.grad /= world
    if rank == 0:
        results.put((loss.item() / world, [p.grad.numpy().copy() for p in params]))  # by value
    dist.barrier()
    dist.destroy_process_group()
    # Skip interpreter teardown: a gloo thread torn down there aborted a rank now and then
    # ("terminate called without an active exception", exit -6) after the result was in.
    results.close()
    results.join_thread()
    os._exit(0)


@pytest.mark.parametrize("local_loss", [False, True])
def test_two_ranks_equal_one_process(tmp_path, local_loss):
    """Loss and gradients of 2 gloo ranks (features gathered with grad) match 1 process."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init_file = str(tmp_path / "pg")
    procs = [ctx.Process(target=_rank, args=(r, 2, init_file, local_loss, results)) for r in range(2)]
    for p in procs:
        p.start()
    loss2, grads2 = results.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    loss1, grads1 = _single(local_loss)
    assert loss2 == pytest.approx(loss1, rel=1e-5)
    for g1, g2 in zip(grads1, grads2):
        torch.testing.assert_close(torch.from_numpy(g2), g1, rtol=1e-4, atol=1e-6)


def test_perfect_alignment_has_no_loss():
    """Sanity: the loss is symmetric and perfect alignment gives near-zero loss."""
    feats = torch.nn.functional.normalize(torch.eye(4), dim=-1)
    out = clip_loss(feats, feats, torch.tensor([100.0]))
    assert out["loss"].item() < 1e-3 and out["acc"].item() == 1.0
