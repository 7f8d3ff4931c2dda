"""The KV-cache decode kernels, called directly: Triton (kernels/kvcache.py, interpreted without a
GPU) and the C++ op fastgpt::cpp_attention_kvcache (CPU).

The oracle gathers each sequence's valid keys out of the cache (dense rows, or pages through the
block table) and runs fastgpt.reference on them in float64; the kernels must stay within twice
plain PyTorch's error in their dtype plus the dtype's rounding floor (tests/oracle.py). Cache
slots past each sequence's length, pages no sequence owns and block-table entries past the
sequence's pages are NaN / -1, so a kernel that reads them fails.

The interpreter's tiles are 16 x 16 (16 query rows: GQA group x Tq; 16 keys), at least 16 keys
per split; the shapes below put lengths on and off tile, page and split boundaries.
"""

import pytest
import torch
from oracle import DEVICE, INTERPRETED, rounding_floor

import fastgpt
from fastgpt.reference import reference_attention_with_lse

BACKENDS = []
if DEVICE.type == "cuda" or INTERPRETED:
    BACKENDS.append("triton")
if "cpp" in fastgpt.available_backends("cpu"):
    BACKENDS.append("cpp")


def kvcache_kernel(backend: str, device: torch.device):
    """The entry point of one backend: f(q, k_cache, v_cache, seqlens_k, block_table, causal,
    scale) -> out."""
    if backend == "triton":
        from fastgpt.kernels.kvcache import kvcache_attention

        return kvcache_attention
    import fastgpt.kvcache_ops  # noqa: F401  (the fake implementation)

    return torch.ops.fastgpt.cpp_attention_kvcache


def backend_device(backend: str) -> torch.device:
    return DEVICE if backend == "triton" else torch.device("cpu")


class Case:
    """A cache holding `lengths` keys per sequence, and the same keys gathered per sequence."""

    def __init__(self, B, Tq, H, Hkv, D, lengths, page_size, capacity, dtype, device, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.lengths = lengths
        self.q = torch.randn(B, Tq, H, D, generator=g, dtype=torch.float64).to(dtype)
        self.keys = [torch.randn(n, Hkv, D, generator=g, dtype=torch.float64) for n in lengths]
        self.values = [torch.randn(n, Hkv, D, generator=g, dtype=torch.float64) for n in lengths]
        self.keys = [t.to(dtype) for t in self.keys]  # (len_b, Hkv, D) each
        self.values = [t.to(dtype) for t in self.values]
        self.seqlens = torch.tensor(lengths, dtype=torch.int32)
        if page_size is None:
            self.block_table = None
            self.k_cache, self.v_cache = self._dense(B, capacity, Hkv, D, dtype)
        else:
            self.block_table, self.k_cache, self.v_cache = self._paged(
                capacity, page_size, Hkv, D, dtype, g
            )
        self._to(device)

    def _dense(self, B, Tmax, Hkv, D, dtype):
        caches = []
        for rows in (self.keys, self.values):
            cache = torch.full((B, Tmax, Hkv, D), float("nan"), dtype=dtype)
            for b, x in enumerate(rows):
                cache[b, : len(x)] = x
            caches.append(cache)
        return caches

    def _paged(self, capacity, page_size, Hkv, D, dtype, g):
        assert capacity % page_size == 0
        needed = [-(-n // page_size) for n in self.lengths]
        pages = sum(needed) + 2  # two pages nobody owns
        order = torch.randperm(pages, generator=g).tolist()
        table = torch.full((len(self.lengths), capacity // page_size), -1, dtype=torch.int32)
        caches = [torch.full((pages, page_size, Hkv, D), float("nan"), dtype=dtype) for _ in "kv"]
        for b, n_pages in enumerate(needed):
            for p in range(n_pages):
                page = order.pop()
                table[b, p] = page
                for cache, rows in zip(caches, (self.keys, self.values), strict=True):
                    chunk = rows[b][p * page_size : (p + 1) * page_size]
                    cache[page, : len(chunk)] = chunk
        return table, *caches

    def _to(self, device):
        self.q, self.k_cache, self.v_cache = (
            t.to(device) for t in (self.q, self.k_cache, self.v_cache)
        )
        self.seqlens = self.seqlens.to(device)
        if self.block_table is not None:
            self.block_table = self.block_table.to(device)

    def run(self, fn, causal, scale, q=None):
        q = self.q if q is None else q
        return fn(q, self.k_cache, self.v_cache, self.seqlens, self.block_table, causal, scale)

    def reference(self, causal, scale, dtype=None):
        """(out (B, Tq, H, D), lse (B, H, Tq)) of fastgpt.reference per sequence, on the CPU; in
        float64 by default, else plain PyTorch computing in `dtype`."""
        outs, lses = [], []
        for b in range(len(self.lengths)):
            q_b = self.q[b].cpu().transpose(0, 1)[None]  # (1, H, Tq, D)
            k_b, v_b = (x[b].transpose(0, 1)[None] for x in (self.keys, self.values))
            if dtype is None:
                q_b, k_b, v_b = q_b.double(), k_b.double(), v_b.double()
            out, lse = reference_attention_with_lse(q_b, k_b, v_b, causal, scale, dtype)
            outs.append(out[0].transpose(0, 1))  # (Tq, H, D)
            lses.append(lse[0])  # (H, Tq)
        return torch.stack(outs), torch.stack(lses)


def assert_close_2x(got, case, causal, scale, what):
    """The oracle rule on out: at most 2x plain PyTorch's error in got's dtype + rounding floor."""
    ref, _ = case.reference(causal, scale)
    plain, _ = case.reference(causal, scale, dtype=got.dtype)
    assert got.shape == ref.shape and got.dtype == case.q.dtype, f"{what}: {got.shape} {got.dtype}"
    got = got.cpu()
    assert torch.isfinite(got).all(), f"{what}: {(~torch.isfinite(got)).sum()} non-finite"
    err = (got.double() - ref).abs()
    bound = 2 * (plain.double() - ref).abs().max().item() + rounding_floor(ref, got.dtype)
    worst = [int(i) for i in torch.unravel_index(err.argmax(), err.shape)]
    assert err.max() <= bound, f"{what}: error {err.max():.3g} at {worst} over {bound:.3g}"
    no_key = ref.abs().amax(-1) == 0  # rows that see no key: exactly 0
    assert (got[no_key] == 0).all(), f"{what}: a row that sees no key is not 0"


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def skip_unsupported(backend, dtype):
    if backend not in BACKENDS:
        pytest.skip(f"the {backend} kvcache kernel does not run here")
    if backend == "triton" and INTERPRETED and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter computes bf16 tl.dot wrongly (compiled on a GPU)")


# layout -> (page_size, capacity, lengths of 5 sequences: 0, full, on and off tile / page edges)
LAYOUTS = {
    "dense": (None, 80, [0, 80, 33, 1, 64]),
    "page16": (16, 96, [17, 0, 96, 48, 5]),
    "page64": (64, 128, [128, 63, 0, 65, 2]),
    "page256": (256, 256, [256, 100, 3, 0, 17]),
    # Pages smaller than the interpreter's 16-key tile, or not a multiple of it: a table entry
    # per key (the gather path a compiled 16-key page takes with 64- or 128-key tiles).
    "page8": (8, 48, [9, 48, 0, 16, 31]),
    "page24": (24, 72, [25, 0, 72, 47, 3]),
}


# (Tq, causal): one query row sees every key either way, so Tq = 1 runs once.
ROWS = {"tq1": (1, True), "tq3_causal": (3, True), "tq3_full": (3, False)}


@pytest.mark.parametrize("rows", list(ROWS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_layouts_match_float64(backend, layout, rows):
    # GQA group 2; Tq = 3 puts 6 rows in the tile, with rows that see no key at lengths < 3.
    skip_unsupported(backend, torch.float32)
    tq, causal = ROWS[rows]
    page_size, capacity, lengths = LAYOUTS[layout]
    case = Case(5, tq, 4, 2, 16, lengths, page_size, capacity, torch.float32,
                backend_device(backend))  # fmt: skip
    out = case.run(kvcache_kernel(backend, DEVICE), causal, 0.25)
    assert_close_2x(out, case, causal, 0.25, f"{backend} {layout} Tq={tq}")


# (H, Hkv, D, Tq): MHA, MQA with a group of 8 (x Tq = 24 rows: two 16-row tiles), odd head dim.
HEADS = {"mha": (3, 3, 16, 2), "mqa": (8, 1, 32, 3), "gqa_d40": (6, 2, 40, 1)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_heads_and_dtypes_match_float64(backend, heads, dtype):
    skip_unsupported(backend, dtype)
    H, Hkv, D, tq = HEADS[heads]
    case = Case(3, tq, H, Hkv, D, [40, 0, 64], 16, 64, dtype, backend_device(backend), seed=1)
    out = case.run(kvcache_kernel(backend, DEVICE), True, D**-0.5)
    assert_close_2x(out, case, True, D**-0.5, f"{backend} {heads} {dtype}")


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_strided_inputs(backend):
    # q a transposed view, k and v interleaved in one buffer: every stride differs from dense.
    skip_unsupported(backend, torch.float32)
    device = backend_device(backend)
    case = Case(2, 3, 4, 2, 16, [50, 7], None, 64, torch.float32, device, seed=2)
    q = case.q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, Tq, H, D), Tq stride D
    kv = torch.stack([case.k_cache, case.v_cache], dim=2)  # (B, Tmax, 2, Hkv, D)
    case.k_cache, case.v_cache = kv[:, :, 0], kv[:, :, 1]
    assert not q.is_contiguous() and not case.k_cache.is_contiguous()
    out = case.run(kvcache_kernel(backend, DEVICE), True, -0.3, q=q)  # a negative scale too
    assert_close_2x(out, case, True, -0.3, f"{backend} strided")


@pytest.mark.skipif("triton" not in BACKENDS, reason="no Triton here")
@pytest.mark.parametrize("num_splits", [1, 5])
def test_triton_splits_and_lse(num_splits):
    # 5 splits of 16 keys over a 80-key cache: sequences of 0 and 9 keys leave empty splits.
    from fastgpt.kernels.kvcache import kvcache_attention_with_lse

    case = Case(3, 2, 4, 2, 16, [80, 0, 9], None, 80, torch.float32, DEVICE, seed=3)
    out, lse = kvcache_attention_with_lse(
        case.q, case.k_cache, case.v_cache, case.seqlens, None, True, 0.25, num_splits
    )
    assert_close_2x(out, case, True, 0.25, f"splits={num_splits}")
    ref_lse = case.reference(True, 0.25)[1]
    finite = torch.isfinite(ref_lse)
    assert lse.shape == ref_lse.shape and torch.equal(torch.isfinite(lse.cpu()), finite)
    assert (lse.cpu()[finite].double() - ref_lse[finite]).abs().max() < 1e-5


@pytest.mark.skipif("triton" not in BACKENDS, reason="no Triton here")
@pytest.mark.parametrize("layout", ["dense", "page16"])
@pytest.mark.parametrize("hint", ["exact", "loose"])
def test_triton_max_seqlen_k_sizes_the_splits(layout, hint):
    # A cache of 256 slots holding at most 37 keys. Interpreted (4 "SMs", 16-key tiles): split by
    # the capacity, 2 splits of 128 keys leave one program per sequence with work; split by the
    # hint, 2 chunks of 32 keys, both working on the longest sequence. (Compiled, chunks of 512
    # keys at least: one split either way.) The numbers do not change.
    from fastgpt.kernels import kvcache as kk

    page = 16 if layout == "page16" else None
    case = Case(4, 1, 4, 2, 16, [37, 0, 9, 20], page, 256, torch.float32, DEVICE, seed=4)
    max_seqlen_k = 37 if hint == "exact" else 48
    busy = kk._splits(4 * 2, max_seqlen_k, DEVICE, None)
    by_capacity = kk._splits(4 * 2, 256, DEVICE, None)
    assert busy[0] * busy[1] >= max_seqlen_k and busy[1] <= by_capacity[1]
    if INTERPRETED:
        assert busy == (2, 32) and by_capacity == (2, 128)
    out = kk.kvcache_attention(
        case.q, case.k_cache, case.v_cache, case.seqlens, case.block_table, True, 0.25,
        max_seqlen_k=max_seqlen_k,
    )  # fmt: skip
    assert_close_2x(out, case, True, 0.25, f"{layout} max_seqlen_k={max_seqlen_k}")
    # With lse and variants too; a hint of 0 (every sequence empty) returns zeros and +inf.
    out_lse, lse = kk.kvcache_attention_with_lse(
        case.q, case.k_cache, case.v_cache, case.seqlens, case.block_table, True, 0.25,
        max_seqlen_k=max_seqlen_k, window=(12, -1),
    )  # fmt: skip
    want_window = kk.kvcache_attention_with_lse(
        case.q, case.k_cache, case.v_cache, case.seqlens, case.block_table, True, 0.25,
        window=(12, -1),
    )  # fmt: skip
    torch.testing.assert_close(out_lse, want_window[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, want_window[1], atol=1e-6, rtol=1e-5)
    empty = Case(2, 1, 4, 2, 16, [0, 0], page, 64, torch.float32, DEVICE)
    out0, lse0 = kk.kvcache_attention_with_lse(
        empty.q, empty.k_cache, empty.v_cache, empty.seqlens, empty.block_table, True, 0.25,
        max_seqlen_k=0,
    )  # fmt: skip
    assert (out0 == 0).all() and torch.isinf(lse0).all()


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_bad_inputs_raise_one_sentence(backend):
    skip_unsupported(backend, torch.float32)
    fn = kvcache_kernel(backend, DEVICE)
    case = Case(2, 1, 4, 2, 16, [5, 7], 16, 32, torch.float32, backend_device(backend))
    errors = (ValueError, TypeError, RuntimeError)
    with pytest.raises(errors, match="seqlens_k"):
        fn(case.q, case.k_cache, case.v_cache, case.seqlens.long(), case.block_table, True, 1.0)
    with pytest.raises(errors, match="block_table"):
        fn(case.q, case.k_cache, case.v_cache, case.seqlens, case.block_table[:1], True, 1.0)
    with pytest.raises(errors, match="head"):
        fn(case.q[..., :8], case.k_cache, case.v_cache, case.seqlens, case.block_table, True, 1.0)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("threads", [1, 2])
def test_cpp_long_sequences_take_several_splits(threads):
    # 1000 and 700 keys over two kv heads: splits of 448 keys (at 2 threads), merged by the LSE.
    case = Case(2, 3, 4, 2, 32, [1000, 700], 64, 1024, torch.float32, "cpu", seed=4)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = case.run(kvcache_kernel("cpp", DEVICE), True, 32**-0.5)
    finally:
        torch.set_num_threads(before)
    assert_close_2x(out, case, True, 32**-0.5, f"cpp long, {threads} threads")


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("layout", ["dense", "page16"])
def test_cpp_float64_equals_the_reference(layout):
    page_size, capacity, lengths = LAYOUTS[layout]
    case = Case(5, 3, 4, 2, 16, lengths, page_size, capacity, torch.float64, "cpu", seed=5)
    out = case.run(kvcache_kernel("cpp", DEVICE), True, 0.25)
    torch.testing.assert_close(out, case.reference(True, 0.25)[0], atol=1e-10, rtol=1e-10)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("layout", ["dense", "page16"])
def test_cpp_opcheck(layout):
    page_size, capacity, lengths = LAYOUTS[layout]
    case = Case(5, 2, 4, 2, 16, lengths, page_size, capacity, torch.float32, "cpu", seed=6)
    kvcache_kernel("cpp", DEVICE)  # registers the fake
    args = (case.q, case.k_cache, case.v_cache, case.seqlens, case.block_table, True, 0.25)
    torch.library.opcheck(torch.ops.fastgpt.cpp_attention_kvcache.default, args)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
def test_cpp_rejects_lengths_past_the_cache_and_bad_block_ids():
    fn = kvcache_kernel("cpp", DEVICE)
    case = Case(2, 1, 4, 2, 16, [5, 20], 16, 32, torch.float32, "cpu")
    too_long = torch.tensor([5, 33], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"seqlens_k\[1\] = 33 is outside"):
        fn(case.q, case.k_cache, case.v_cache, too_long, case.block_table, True, 1.0)
    table = case.block_table.clone()
    table[1, 1] = case.k_cache.shape[0]  # a used page past the last block
    with pytest.raises(ValueError, match=r"block_table\[1, 1\]"):
        fn(case.q, case.k_cache, case.v_cache, case.seqlens, table, True, 1.0)
