"""flexprefill_hf.testing: the structured and the clustered synthetic inputs of the benchmarks."""

from __future__ import annotations

import pytest
import torch

from flexprefill_hf.testing import clustered_qkv, structured_qkv


def _neighbour_share(q, k, top=200):
    """Per KV head: the share of the ``top`` keys most aligned with the queries' mean whose next key is also one.

    Only the second half of the dims (no rotary code there: noise plus the stripe direction) is scored, so the
    local band does not rank the keys.
    """
    half = q.shape[-1] // 2
    mean_q = q[0, :, :, half:].mean(0)  # [H, D/2] (here Hq == Hkv)
    scores = torch.einsum("nhd,hd->hn", k[0, :, :, half:], mean_q)  # [H, N]
    shares = []
    for row in scores:
        chosen = torch.zeros(row.numel(), dtype=torch.bool)
        chosen[row.topk(top).indices] = True
        shares.append(float((chosen[1:] & chosen[:-1]).sum() / chosen.sum()))
    return shares


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clustered_stripes_come_in_runs_and_structured_ones_do_not(seed):
    kwargs = dict(dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    clustered = _neighbour_share(*clustered_qkv(1, 4096, 2, 2, 64, **kwargs)[:2])
    kwargs["generator"] = torch.Generator().manual_seed(seed)
    scattered = _neighbour_share(*structured_qkv(1, 4096, 2, 2, 64, **kwargs)[:2])
    assert min(clustered) > 0.2 and max(scattered) < 0.12, (clustered, scattered)


def test_run_of_one_is_the_structured_input_and_shapes_follow_the_arguments():
    make = lambda fn, **kw: fn(2, 500, 4, 2, 32, q_len=70, generator=torch.Generator().manual_seed(5), **kw)
    for a, b in zip(make(structured_qkv), make(clustered_qkv, run=1)):
        assert torch.equal(a, b)
    q, k, v = make(clustered_qkv, dtype=torch.bfloat16)
    assert q.shape == (2, 70, 4, 32) and k.shape == v.shape == (2, 500, 2, 32)
    assert q.dtype == k.dtype == torch.bfloat16 and q.is_contiguous() and k.is_contiguous()
    again = make(clustered_qkv, dtype=torch.bfloat16)
    assert all(torch.equal(x, y) for x, y in zip((q, k, v), again))


@pytest.mark.parametrize("run", [0, -3, 2.0, True])
def test_clustered_refuses_a_bad_run(run):
    with pytest.raises(ValueError, match=f"run={run!r} is not supported; expected an int >= 1"):
        clustered_qkv(1, 64, 1, 1, 16, run=run)
