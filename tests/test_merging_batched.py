"""The batched ToMe/AIM merge equals the one-sample reference (the pre-vectorisation loop)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from learned_prune.pruners.merging import bipartite_merge, merge_schedule, merge_to, merge_to_batched


# ---- reference: the original one-sample implementation, kept verbatim in semantics ----------------
def ref_bipartite_merge(x, metric, size, slot, r):
    n = x.shape[0]
    r = min(r, n // 2)
    if r <= 0:
        return x, metric, size, slot
    m = F.normalize(metric.float(), dim=-1)
    a, b = torch.arange(0, n, 2), torch.arange(1, n, 2)
    scores = m[a] @ m[b].T
    best, dst = scores.max(-1)
    order = best.argsort(descending=True)
    merged_a, kept_a = order[:r], order[r:]
    w = size[:, None].to(x.dtype)
    xb, mb, sb = x[b] * w[b], metric[b] * w[b].to(metric.dtype), size[b].clone()
    xb = xb.index_add(0, dst[merged_a], x[a[merged_a]] * w[a[merged_a]])
    mb = mb.index_add(0, dst[merged_a], metric[a[merged_a]] * w[a[merged_a]].to(metric.dtype))
    sb = sb.index_add(0, dst[merged_a], size[a[merged_a]])
    xb, mb = xb / sb[:, None].to(x.dtype), mb / sb[:, None].to(metric.dtype)
    keep_a = a[kept_a]
    new_x = torch.cat([x[keep_a], xb])
    new_m = torch.cat([metric[keep_a], mb])
    new_s = torch.cat([size[keep_a], sb])
    new_slot = torch.cat([slot[keep_a], slot[b]])
    order = new_slot.argsort()
    return new_x[order], new_m[order], new_s[order], new_slot[order]


def ref_merge_to(x, metric, target, first_steps=None):
    size = torch.ones(x.shape[0])
    slot = torch.arange(x.shape[0])
    for r in first_steps or []:
        if x.shape[0] <= target:
            break
        x, metric, size, slot = ref_bipartite_merge(x, metric, size, slot, min(r, x.shape[0] - target))
    while x.shape[0] > target:
        x, metric, size, slot = ref_bipartite_merge(x, metric, size, slot, x.shape[0] - target)
    return x, slot


def ref_batch(x, metric, n, k, aim):
    """The old pruner loop: one sample at a time, padded with zeros / -1."""
    vals, slots = [], []
    for b in range(x.shape[0]):
        nb = int(n[b])
        m = x[b, :nb] if metric is None else metric[b, :nb]
        v, s = ref_merge_to(x[b, :nb], m, int(k[b]), [nb // 2, nb // 4] if aim else [])
        vals.append(v)
        slots.append(s)
    kmax = max(v.shape[0] for v in vals)
    out = x.new_zeros(x.shape[0], kmax, x.shape[-1])
    idx = torch.full((x.shape[0], kmax), -1, dtype=torch.long)
    for b, (v, s) in enumerate(zip(vals, slots)):
        out[b, : v.shape[0]], idx[b, : s.shape[0]] = v, s
    return out, idx


def _batched(x, metric, n, k, aim):
    return merge_to_batched(x, metric, k, n=n, first_steps=[n // 2, n // 4] if aim else None)


# ---- random inputs ---------------------------------------------------------------------------------
CASES = [  # (B, N, n per sample, k per sample)
    (1, 144, [144], [64]),
    (3, 144, [144, 144, 144], [64, 64, 64]),
    (4, 144, [144, 101, 37, 144], [64, 64, 30, 10]),  # padded samples, per-sample budgets
    (3, 576, [576, 576, 400], [64, 64, 64]),
    (5, 31, [31, 2, 1, 17, 30], [5, 1, 1, 17, 29]),  # odd counts, no-op samples, single steps
    (2, 40, [40, 39], [40, 1]),  # keep-all next to merge-down-to-1
]


@pytest.mark.parametrize("aim", [False, True], ids=["tome", "aim"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}N{c[1]}")
def test_batched_merge_equals_reference(case, aim):
    B, N, n, k = case
    g = torch.Generator().manual_seed(B * 1000 + N + aim)
    x = torch.randn(B, N, 24, generator=g)
    x[:, :, 0] += 2.0  # some shared direction so merges chain across steps
    metric = None if aim else torch.randn(B, N, 8, generator=g) + 0.5
    n, k = torch.tensor(n), torch.tensor(k)
    want_v, want_i = ref_batch(x, metric, n, k, aim)
    got_v, got_i = _batched(x, metric, n, k, aim)
    assert torch.equal(got_i, want_i)
    torch.testing.assert_close(got_v, want_v, rtol=1e-5, atol=1e-5)
    assert got_v.dtype == x.dtype


@pytest.mark.parametrize("aim", [False, True], ids=["tome", "aim"])
def test_batched_merge_samples_independent(aim):
    """A sample's result does not depend on its batch neighbours (or their padding)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 60, 16, generator=g)
    metric = None if aim else torch.randn(3, 60, 6, generator=g)
    n, k = torch.tensor([60, 45, 20]), torch.tensor([12, 12, 7])
    got_v, got_i = _batched(x, metric, n, k, aim)
    for b in range(3):
        nb = int(n[b])
        mb = None if metric is None else metric[b : b + 1, :nb]
        v, i = _batched(x[b : b + 1, :nb], mb, n[b : b + 1], k[b : b + 1], aim)
        kb = int(k[b])
        assert torch.equal(got_i[b, :kb], i[0]) and bool((got_i[b, kb:] == -1).all())
        torch.testing.assert_close(got_v[b, :kb], v[0], rtol=1e-6, atol=1e-6)
        assert bool((got_v[b, kb:] == 0).all())


@pytest.mark.parametrize("aim", [False, True], ids=["tome", "aim"])
def test_bfloat16_matches_reference(aim):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 50, 32, generator=g).bfloat16()
    metric = None if aim else torch.randn(2, 50, 8, generator=g).bfloat16()
    n, k = torch.tensor([50, 44]), torch.tensor([10, 13])
    want_v, want_i = ref_batch(x, metric, n, k, aim)
    got_v, got_i = _batched(x, metric, n, k, aim)
    assert got_v.dtype == torch.bfloat16
    assert torch.equal(got_i, want_i)
    torch.testing.assert_close(got_v, want_v)


# ---- hand-made cases with known answers ------------------------------------------------------------
def test_identical_tokens_merge_first():
    # 6 tokens, A = {0, 2, 4}, B = {1, 3, 5}; token 4 duplicates token 1 exactly; all others are
    # orthogonal. With r = 1 the (4 -> 1) edge (cosine 1) is the one that merges.
    e = torch.eye(6)
    x = e.clone()
    x[4] = x[1]
    x = x * torch.arange(1.0, 7.0)[:, None]  # distinct magnitudes: cosine ignores them
    values, slots = merge_to_batched(x[None], None, torch.tensor([5]))
    assert slots[0].tolist() == [0, 1, 2, 3, 5]
    torch.testing.assert_close(values[0, 1], (x[1] + x[4]) / 2)
    torch.testing.assert_close(values[0, [0, 2, 3, 4]], x[[0, 2, 3, 5]])


def test_known_two_step_merge_in_a_padded_batch():
    # sample 0: pairs (0,1), (2,3), (4,5), (6,7) are identical up to scale; down to 4 tokens merges
    # each pair into its B token (one step, r = 4). Sample 1 (3 valid tokens, rest padding) keeps all.
    base = torch.eye(4)
    x0 = torch.stack([base[0], 3 * base[0], base[1], 3 * base[1], base[2], 3 * base[2], base[3], 3 * base[3]])
    x1 = torch.zeros(8, 4)
    x1[:3] = torch.randn(3, 4)
    x = torch.stack([x0, x1])
    values, slots = merge_to_batched(x, None, torch.tensor([4, 3]), n=torch.tensor([8, 3]))
    assert slots.tolist() == [[1, 3, 5, 7], [0, 1, 2, -1]]
    torch.testing.assert_close(values[0], 2 * base)  # (1 + 3) / 2 along each axis
    torch.testing.assert_close(values[1, :3], x1[:3])
    assert bool((values[1, 3] == 0).all())


def test_schedule_halves_and_aim_first_steps():
    n, k = torch.tensor([144, 576, 64]), torch.tensor([64, 64, 64])
    tome = [r.tolist() for r in merge_schedule(n, k)]
    # at most half per step: 144 -> 72 -> 64 (2 steps), 576 -> 288 -> 144 -> 72 -> 64 (4 steps)
    assert tome == [[72, 288, 0], [8, 144, 0], [0, 72, 0], [0, 8, 0]]
    aim = [r.tolist() for r in merge_schedule(n, k, [n // 2, n // 4])]
    assert aim == tome
    n = torch.tensor([100])
    aim = [r.tolist() for r in merge_schedule(n, torch.tensor([30]), [n // 2, n // 4])]
    assert aim == [[50], [20]]  # the second AIM step stops at the budget


def test_one_sample_wrappers_match_reference():
    g = torch.Generator().manual_seed(11)
    x, metric = torch.randn(20, 5, generator=g), torch.randn(20, 3, generator=g)
    size = torch.randint(1, 4, (20,), generator=g).float()
    slot = torch.arange(20) * 2
    got = bipartite_merge(x, metric, size, slot, 7)
    want = ref_bipartite_merge(x, metric, size, slot, 7)
    assert torch.equal(got[3], want[3]) and torch.equal(got[2], want[2])
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    v, s = merge_to(x, metric, 6, [10, 5])
    rv, rs = ref_merge_to(x, metric, 6, [10, 5])
    assert torch.equal(s, rs)
    torch.testing.assert_close(v, rv)


@pytest.mark.parametrize("aim", [False, True], ids=["tome", "aim"])
def test_ties_break_as_reference(aim):
    """Exact duplicates and all-zero metric rows (LLaVA-NeXT's newline tokens) tie: the batched
    merge breaks the ties as the reference does (first B on a row, then position order), to the bit.

    Checked one sample per call: in a padded batch the score GEMM has the batch's padded shape, and
    BLAS may round a duplicate pair's cosine 1 ulp differently than at the sample's own shape, so
    ties between exact duplicates can then break differently (the merged slots stay the same here)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 48, 12, generator=g)
    x[:, 5::6] = x[:, 5:6]  # every 6th token a copy of token 5 (newline-like)
    metric = None
    if not aim:
        metric = torch.randn(2, 48, 4, generator=g)
        metric[:, 5::6] = 0.0  # newline tokens have no vision keys
        metric[:, 10:14] = metric[:, 10:11]
    n, k = torch.tensor([48, 41]), torch.tensor([9, 16])
    for b in range(2):
        nb = int(n[b])
        xb, mb = x[b : b + 1, :nb], None if metric is None else metric[b : b + 1, :nb]
        want_v, want_i = ref_batch(xb, mb, n[b : b + 1], k[b : b + 1], aim)
        got_v, got_i = _batched(xb, mb, n[b : b + 1], k[b : b + 1], aim)
        assert torch.equal(got_i, want_i)
        assert torch.equal(got_v, want_v)
    want_v, want_i = ref_batch(x, metric, n, k, aim)
    got_v, got_i = _batched(x, metric, n, k, aim)
    assert torch.equal(got_i, want_i)
