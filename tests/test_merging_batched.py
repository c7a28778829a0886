"""The batched ToMe/AIM merge equals a one-sample restatement of the official steps.

Reference: ToMe's ``bipartite_soft_matching`` (facebookresearch/ToMe ``tome/merge.py``, no class
token) with ``merge_wavg``, and AIM's ``bipartite_soft_matching_merge`` (LaVi-Lab/AIM
``llava/model/token_merge.py``: ``scatter_reduce(..., reduce="mean")``, a plain mean), written here
one sample at a time with the official ops: the output of a step is ``[unmerged A in edge-rank
order, B]`` and the next step splits that order into A/B again.
"""

from __future__ import annotations

import pytest
import torch

from learned_prune.pruners.merging import bipartite_merge, merge_schedule, merge_to, merge_to_batched


# ---- reference: the official step, one sample ------------------------------------------------------
def ref_step(x, metric, size, source, r, mode):
    """One official step on one sample (x (N, D), metric (N, Dm) or None = x)."""
    t = x.shape[0]
    r = min(r, t // 2)
    if r <= 0:
        return x, metric, size, source
    m = (x if metric is None else metric).float()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (all-zero rows: cosine 0, not NaN)
    scores = m[0::2] @ m[1::2].T
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(descending=True, stable=True)
    unm_idx, src_idx = edge_idx[r:], edge_idx[:r]
    dst_idx = node_idx[src_idx]

    def merge(v, reduce):
        src, dst = v[0::2], v[1::2]
        unm = src[unm_idx]
        idx = dst_idx[:, None].expand(r, v.shape[1]) if v.dim() == 2 else dst_idx
        dst = dst.scatter_reduce(0, idx, src[src_idx], reduce=reduce)
        return torch.cat([unm, dst])

    src_ids = torch.cat([source[0::2][unm_idx], source[1::2]])
    if mode == "wavg":  # ToMe's merge_wavg
        w = size[:, None].to(x.dtype)
        new_size = merge(size, "sum")
        new_x = merge(x * w, "sum") / new_size[:, None].to(x.dtype)
        new_m = None
        if metric is not None:
            new_m = merge(metric * size[:, None].to(metric.dtype), "sum") / new_size[:, None].to(metric.dtype)
        return new_x, new_m, new_size, src_ids
    new_x = merge(x, "mean")
    new_m = None if metric is None else merge(metric, "mean")
    return new_x, new_m, size, src_ids


def ref_merge(x, metric, target, aim):
    N = x.shape[0]
    size, source = torch.ones(N), torch.arange(N)
    i = 1
    while x.shape[0] > target:
        n = x.shape[0]
        r = min(n - target, n // 2)
        if aim:  # AIM: N // 2, N // 4, then its commented-out N // 8, N // 16, ...
            r = min(r, N // 2**i if N // 2**i > 0 else n // 2)
        x, metric, size, source = ref_step(x, metric, size, source, r, "mean" if aim else "wavg")
        i += 1
    return x, source


def ref_batch(x, metric, n, k, aim):
    vals, srcs = [], []
    for b in range(x.shape[0]):
        nb = int(n[b])
        v, s = ref_merge(x[b, :nb], None if metric is None else metric[b, :nb], int(k[b]), aim)
        vals.append(v)
        srcs.append(s)
    kmax = max(v.shape[0] for v in vals)
    out = x.new_zeros(x.shape[0], kmax, x.shape[-1])
    idx = torch.full((x.shape[0], kmax), -1, dtype=torch.long)
    for b, (v, s) in enumerate(zip(vals, srcs)):
        out[b, : v.shape[0]], idx[b, : s.shape[0]] = v, s
    return out, idx


def _batched(x, metric, n, k, aim):
    return merge_to_batched(x, metric, k, n=n, mode="mean" if aim else "wavg", aim_schedule=aim)


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
    """A sample's result does not depend on its batch neighbours (or their padding, or their
    needing more steps: a sample that is done keeps its order)."""
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
def test_identical_tokens_merge_first_and_output_order():
    # 6 tokens, A = {0, 2, 4}, B = {1, 3, 5}; token 4 duplicates token 1 exactly; all others are
    # orthogonal. With r = 1 the (4 -> 1) edge (cosine 1) merges; the output is [unmerged A in
    # edge-rank order (0 and 2 tie at cosine 0: position order), B tokens 1, 3, 5].
    e = torch.eye(6)
    x = e.clone()
    x[4] = x[1]
    x = x * torch.arange(1.0, 7.0)[:, None]  # distinct magnitudes: cosine ignores them
    values, sources = merge_to_batched(x[None], None, torch.tensor([5]))
    assert sources[0].tolist() == [0, 2, 1, 3, 5]
    torch.testing.assert_close(values[0, 2], (x[1] + x[4]) / 2)
    torch.testing.assert_close(values[0, [0, 1, 3, 4]], x[[0, 2, 3, 5]])


def test_aim_second_step_is_a_plain_mean():
    # directions d0, d1 (10 deg from d0), d2 (90 deg), d3 (100 deg). Step 1 (r = 4): A tokens 0 and
    # 2 (d0) merge into B token 1 (d0), 4 (d2) into 5, 6 (d3) into 7; B token 3 (d1) gets nothing.
    # Step 2 (r = 2) on [1, 3, 5, 7]: A = {1, 5}, B = {3, 7}; 1 -> 3 and 5 -> 7.
    d = [torch.tensor([torch.cos(torch.tensor(a)), torch.sin(torch.tensor(a))]) for a in (0.0, 0.1745, 1.5708, 1.7453)]
    x = torch.stack([1 * d[0], 2 * d[0], 3 * d[0], 4 * d[1], 5 * d[2], 6 * d[2], 7 * d[3], 8 * d[3]])
    tome, src_t = merge_to_batched(x[None], None, torch.tensor([2]), mode="wavg")
    aim, src_a = merge_to_batched(x[None], None, torch.tensor([2]), mode="mean", aim_schedule=True)
    assert src_t[0].tolist() == src_a[0].tolist() == [3, 7]
    t1, t5, t7 = x[:3].mean(0), x[4:6].mean(0), x[6:].mean(0)  # step-1 tokens (plain means)
    torch.testing.assert_close(aim[0], torch.stack([(x[3] + t1) / 2, (t7 + t5) / 2]))  # AIM: plain mean
    torch.testing.assert_close(tome[0], torch.stack([x[:4].mean(0), x[4:].mean(0)]))  # ToMe: size-weighted


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


def test_schedule_halves_and_aim_steps():
    n, k = torch.tensor([144, 576, 64]), torch.tensor([64, 64, 64])
    tome = [r.tolist() for r in merge_schedule(n, k)]
    # at most half per step: 144 -> 72 -> 64 (2 steps), 576 -> 288 -> 144 -> 72 -> 64 (4 steps)
    assert tome == [[72, 288, 0], [8, 144, 0], [0, 72, 0], [0, 8, 0]]
    assert [r.tolist() for r in merge_schedule(n, k, aim=True)] == tome
    assert [r.tolist() for r in merge_schedule(torch.tensor([100]), torch.tensor([30]), aim=True)] == [[50], [20]]
    # N = 300: AIM's steps are N // 2**i (150, 75, 37, 18), not halves of what is left (19)
    assert [r.tolist() for r in merge_schedule(torch.tensor([300]), torch.tensor([10]), aim=True)] == [
        [150], [75], [37], [18], [9], [1]]


def test_one_sample_wrappers():
    g = torch.Generator().manual_seed(11)
    x, metric = torch.randn(20, 5, generator=g), torch.randn(20, 3, generator=g)
    size = torch.randint(1, 4, (20,), generator=g).float()
    slot = torch.arange(20) * 2
    got = bipartite_merge(x, metric, size, slot, 7)
    want = ref_step(x, metric, size, slot, 7, "wavg")
    assert torch.equal(got[3], want[3]) and torch.equal(got[2], want[2])
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    for aim in (False, True):
        v, s = merge_to(x, None if aim else metric, 6, aim=aim)
        rv, rs = ref_merge(x, None if aim else metric, 6, aim)
        order = rs.argsort()
        assert torch.equal(s, rs[order])
        torch.testing.assert_close(v, rv[order])


@pytest.mark.parametrize("aim", [False, True], ids=["tome", "aim"])
def test_ties_break_as_reference(aim):
    """Exact duplicates and all-zero metric rows (LLaVA-NeXT's newline tokens) tie: the batched
    merge breaks the ties as the reference does (first B on a row, then position order).

    Checked one sample per call: in a padded batch the score GEMM has the batch's padded shape, and
    BLAS may round a duplicate pair's cosine 1 ulp differently than at the sample's own shape."""
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
        torch.testing.assert_close(got_v, want_v, rtol=1e-6, atol=1e-6)
