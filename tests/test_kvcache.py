"""fastgpt.attention_with_kvcache against the independent float64 oracle (tests/varlen_oracle.py:
each sequence's logical keys packed, one explicit mask), dense and paged caches, the in-place
append element by element, its input rules and its kernel registry.

Length mixes hit: an empty sequence (0 keys before and after), a sequence that ends exactly at
the cache's end (dense: Tmax; paged: every block of its row), lengths that are no multiple of the
page size, a sequence one key short of a page boundary. Paged caches have shuffled block tables
and spare blocks no sequence uses (they must stay untouched).
"""

import pytest
import torch
from oracle import F64, random_tensors, rounding_floor
from variant_oracle import oracle as variant_oracle
from varlen_oracle import varlen_oracle

import fastgpt
from fastgpt import kvcache
from fastgpt.kvcache import attention_with_kvcache

B, D = 4, 16
HEADS = [(4, 4), (4, 2), (4, 1)]  # MHA, GQA, MQA
# (Tq, Tnew): decoding, a speculative/prefill chunk appended and attended, attention only.
STEPS = [(1, 1), (3, 3), (2, 0)]
LAYOUTS = {"dense": None, "page16": 16, "page64": 64, "page256": 256}
MAX_BLOCKS = 2  # blocks per sequence of a paged cache
TMAX = 40  # slots per sequence of a dense cache


def capacity(page: int | None) -> int:
    return TMAX if page is None else MAX_BLOCKS * page


def lengths_before(page: int | None, t_new: int) -> list[int]:
    """Keys cached per sequence before the append: empty, ragged, one short of a page, full after
    the append."""
    cap, unit = capacity(page), page or 16
    return [0, 7, cap - t_new, unit - 1 - t_new if unit - 1 >= t_new else 3]


class Case:
    """One cache with per-sequence logical keys/values and its slots (for the element checks)."""

    def __init__(self, page, lengths, t_q, t_new, heads, kv_heads, dtype, seed=0):
        self.page, self.lengths, self.t_new = page, lengths, t_new
        cap = capacity(page)
        g = torch.Generator().manual_seed(seed)
        if page is None:
            cache_shape, self.block_table = (B, TMAX, kv_heads, D), None
        else:
            num_blocks = B * MAX_BLOCKS + 3  # 3 spare blocks no sequence names
            perm = torch.randperm(num_blocks, generator=g)[: B * MAX_BLOCKS]
            self.block_table = perm.view(B, MAX_BLOCKS).to(torch.int32)  # shuffled
            cache_shape = (num_blocks, page, kv_heads, D)
        q, k_cache, v_cache, k_all, v_all = random_tensors(
            (B, t_q, heads, D), cache_shape, cache_shape, (B, cap, kv_heads, D),
            (B, cap, kv_heads, D), dtype=dtype, seed=seed,
        )  # fmt: skip
        self.q, self.k_all, self.v_all = q, k_all, v_all  # logical keys: position p of sequence b
        for b, n in enumerate(lengths):  # the cached keys in their slots; the rest stays noise
            for p in range(n):
                k_cache[self.slot(b, p)], v_cache[self.slot(b, p)] = k_all[b, p], v_all[b, p]
        self.k_cache, self.v_cache = k_cache, v_cache
        self.ends = [n + t_new for n in lengths]
        self.k_new = torch.stack([k_all[b, n : n + t_new] for b, n in enumerate(lengths)])
        self.v_new = torch.stack([v_all[b, n : n + t_new] for b, n in enumerate(lengths)])

    def slot(self, b: int, p: int) -> tuple[int, int]:
        """(cache row or block, slot) of position p of sequence b."""
        if self.page is None:
            return b, p
        return int(self.block_table[b, p // self.page]), p % self.page

    def run(self, causal=True, **kwargs):
        k, v = (self.k_new, self.v_new) if self.t_new else (None, None)
        seqlens = torch.tensor(self.lengths, dtype=torch.int32)
        return attention_with_kvcache(
            self.q, self.k_cache, self.v_cache, k, v, cache_seqlens=seqlens,
            block_table=self.block_table, causal=causal, **kwargs,
        )  # fmt: skip

    def oracle(self, causal: bool, dtype: torch.dtype) -> torch.Tensor:
        """The varlen oracle on the logical keys, in dtype: (B, Tq, H, D)."""
        t_q = self.q.shape[1]
        keys = torch.cat([self.k_all[b, :e] for b, e in enumerate(self.ends)])  # (total_k, Hkv, D)
        values = torch.cat([self.v_all[b, :e] for b, e in enumerate(self.ends)])
        args = [t.to(dtype) for t in (self.q.flatten(0, 1), keys, values)]
        out, _ = varlen_oracle(*args, [t_q] * B, self.ends, causal)  # (B Tq, H, D)
        return out.unflatten(0, (B, t_q))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("t_q,t_new", STEPS)
@pytest.mark.parametrize("heads,kv_heads", HEADS)
def test_matches_float64_oracle_and_appends_in_place(layout, t_q, t_new, heads, kv_heads):
    page = LAYOUTS[layout]
    lengths = lengths_before(page, t_new)
    case = Case(page, lengths, t_q, t_new, heads, kv_heads, torch.float64)
    k_before, v_before = case.k_cache.clone(), case.v_cache.clone()
    out = case.run()
    torch.testing.assert_close(out, case.oracle(True, torch.float64), **F64)
    # In place, element by element: the new slots hold k/v, nothing else changed.
    k_want, v_want = k_before.clone(), v_before.clone()
    for b, n in enumerate(lengths):
        for t in range(t_new):
            k_want[case.slot(b, n + t)] = case.k_new[b, t]
            v_want[case.slot(b, n + t)] = case.v_new[b, t]
    assert torch.equal(case.k_cache, k_want) and torch.equal(case.v_cache, v_want)


KERNEL_BACKENDS = [b for b in fastgpt.available_backends("cpu") if b in kvcache.KVCACHE_KERNELS]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", ["dense", "page16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_within_twice_pytorch_error(backend, layout, causal, dtype):
    """In a low dtype, on every backend's kernel: at most 2x plain PyTorch's error (the oracle run
    in that dtype) + floor. The append happens in place before the kernel runs."""
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter's bf16 tl.dot is wrong; bf16 Triton runs on a GPU")
    case = Case(LAYOUTS[layout], lengths_before(LAYOUTS[layout], 3), 3, 3, 4, 2, torch.float64)
    exact = case.oracle(causal, torch.float64)
    plain = case.oracle(causal, dtype)
    for name in ("q", "k_cache", "v_cache", "k_new", "v_new"):
        setattr(case, name, getattr(case, name).to(dtype))
    out = case.run(causal=causal, backend=backend)
    assert out.dtype == dtype and out.shape == exact.shape
    bound = 2 * (plain.double() - exact).abs().max().item() + rounding_floor(exact, dtype)
    assert (out.double() - exact).abs().max().item() <= bound


def test_rows_that_see_no_key_are_zero_and_no_graph_is_recorded():
    case = Case(None, [0, 0, 5, 0], 3, 0, 4, 2, torch.float64)  # Tq = 3 against 0 keys
    case.q.requires_grad_()
    out = case.run()
    assert not out.requires_grad
    assert torch.equal(out[[0, 1, 3]], torch.zeros_like(out[[0, 1, 3]]))
    torch.testing.assert_close(out, case.oracle(True, torch.float64), **F64)


def test_int_cache_seqlens_and_the_drop_in_agree():
    case = Case(16, [9, 9, 9, 9], 1, 1, 4, 1, torch.float64)
    k_cache, v_cache = case.k_cache.clone(), case.v_cache.clone()
    want = case.run()
    got = fastgpt.flash_attn_with_kvcache(
        case.q, k_cache, v_cache, case.k_new, case.v_new, cache_seqlens=9,
        block_table=case.block_table, causal=True,
    )  # fmt: skip
    assert torch.equal(got, want) and torch.equal(k_cache, case.k_cache)


def test_a_registered_kernel_gets_the_lengths_after_the_append(monkeypatch):
    """The registry interface the Triton and C++ kernels plug into."""
    seen = {}

    def kernel(q, k_cache, v_cache, seqlens_k, block_table, causal, scale):
        seen.update(seqlens_k=seqlens_k.tolist(), causal=causal, scale=scale, table=block_table)
        return torch.zeros_like(q)

    monkeypatch.setitem(kvcache.KVCACHE_KERNELS, "cpp", kernel)
    if "cpp" not in fastgpt.available_backends("cpu"):
        pytest.skip("the C++ extension is not built here")
    case = Case(16, [0, 4, 17, 30], 2, 2, 4, 2, torch.float32)
    case.run(backend="cpp", scale=0.5)
    assert seen["seqlens_k"] == [2, 6, 19, 32] and seen["causal"] and seen["scale"] == 0.5
    assert seen["table"] is case.block_table


def test_the_triton_kernel_gets_the_max_seqlen_k_hint(monkeypatch):
    """The Triton kernel is told the longest length after the append (read by the checks anyway),
    or the caller's looser bound; a kernel without the hint (cpp) is called without it."""
    seen = []

    def kernel(q, k_cache, v_cache, seqlens_k, block_table, causal, scale, **hint):
        seen.append(hint)
        return torch.zeros_like(q)

    monkeypatch.setitem(kvcache.KVCACHE_KERNELS, "triton", kernel)
    monkeypatch.setitem(kvcache.KVCACHE_KERNELS, "cpp", kernel)
    backends = fastgpt.available_backends("cpu")
    for backend in [b for b in ("triton", "cpp") if b in backends]:
        seen.clear()
        Case(16, [0, 4, 17, 29], 2, 2, 4, 2, torch.float32).run(backend=backend)
        Case(16, [0, 4, 17, 29], 2, 2, 4, 2, torch.float32).run(backend=backend, max_seqlen_k=32)
        want = [{"max_seqlen_k": 31}, {"max_seqlen_k": 32}] if backend == "triton" else [{}, {}]
        assert seen == want, backend
    if not {"triton", "cpp"} & set(backends):
        pytest.skip("no compiled KV-cache kernel runs here")


def test_backend_without_a_kvcache_kernel(debug_log, monkeypatch):
    """A backend missing from KVCACHE_KERNELS (e.g. cpp on CUDA tensors): the automatic pick
    moves to the reference, an explicit request raises."""
    picked = kvcache.select_backend(torch.device("cpu"))[0]
    if picked == "reference":
        pytest.skip("the automatic pick here is the reference itself")
    kernels = {n: f for n, f in kvcache.KVCACHE_KERNELS.items() if n != picked}
    monkeypatch.setattr(kvcache, "KVCACHE_KERNELS", kernels)
    case = Case(None, [1, 2, 3, 4], 1, 1, 4, 2, torch.float32)
    with pytest.raises(NotImplementedError, match=f"The {picked} backend has no KV-cache"):
        case.run(backend=picked)
    case.run()
    assert any("attention_with_kvcache" in line and "-> reference" in line for line in debug_log())


def error_case(**changes):
    """Keyword arguments of a valid paged call (page 16, 2 blocks each), with changes."""
    q, k_cache, v_cache, k, v = random_tensors(
        (2, 1, 4, 8), (5, 16, 2, 8), (5, 16, 2, 8), (2, 1, 2, 8), (2, 1, 2, 8)
    )
    kwargs = dict(
        q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v,
        cache_seqlens=torch.tensor([3, 20], dtype=torch.int32),
        block_table=torch.tensor([[4, 0], [2, 1]], dtype=torch.int32),
    )  # fmt: skip
    return {**kwargs, **changes}


def bad_block_ids():
    return torch.tensor([[4, 0], [2, 5]], dtype=torch.int32)


ERRORS = {
    "block id past the cache": (
        error_case(block_table=bad_block_ids()),
        ValueError, r"block_table row 1 names blocks \[2, 5\] outside the cache's 5 blocks",
    ),
    "negative block id": (
        error_case(block_table=torch.tensor([[4, 0], [-1, 1]], dtype=torch.int32)),
        ValueError, r"block_table row 1 names blocks \[-1, 1\] outside",
    ),
    "block table too short": (
        error_case(block_table=torch.tensor([[4], [2]], dtype=torch.int32)),
        ValueError, r"block_table \(2, 1\) is too short for the lengths.*need 2 blocks of 16",
    ),
    "length past the cache": (
        error_case(cache_seqlens=torch.tensor([3, 32], dtype=torch.int32)),
        ValueError, r"too short for the lengths: cache_seqlens \[3, 32\] plus 1 new keys",
    ),
    "dense length past the cache": (
        error_case(block_table=None, k_cache=torch.zeros(2, 8, 2, 8),
                   v_cache=torch.zeros(2, 8, 2, 8), cache_seqlens=8),
        ValueError, r"Sequence lengths past the cache.*need 9 slots, k_cache \(2, 8, 2, 8\) has 8",
    ),
    "page size": (
        error_case(k_cache=torch.zeros(5, 24, 2, 8), v_cache=torch.zeros(5, 24, 2, 8)),
        ValueError, "A page size of 24 is not supported.*multiples of 16",
    ),
    "dtype": (
        error_case(k_cache=torch.zeros(5, 16, 2, 8, dtype=torch.float64)),
        TypeError, r"q, k and v must share one dtype.*k_cache \(5, 16, 2, 8\)",
    ),
    "new k dtype": (
        error_case(k=torch.zeros(2, 1, 2, 8, dtype=torch.float64)),
        TypeError, "The new k and v must have the cache's dtype",
    ),
    "device": (
        error_case(k_cache=torch.zeros(5, 16, 2, 8, device="meta")),
        ValueError, "must be on one device",
    ),
    "gqa": (
        error_case(q=torch.zeros(2, 1, 3, 8)),
        ValueError, r"query heads \(3\) must be a multiple of the number of key/value heads \(2\)",
    ),
    "new k shape": (
        error_case(k=torch.zeros(2, 1, 1, 8), v=torch.zeros(2, 1, 1, 8)),
        ValueError, r"new k and v must be \(B, Tnew, Hkv, D\) = \(2, Tnew, 2, 8\)",
    ),
    "k without v": (error_case(v=None), ValueError, "both k and v"),
    "seqlens dtype": (
        error_case(cache_seqlens=torch.tensor([3, 20])),
        TypeError, "cache_seqlens must be an int or an int32 \\(B,\\) tensor, got torch.int64",
    ),
    "negative length": (
        error_case(cache_seqlens=torch.tensor([-1, 20], dtype=torch.int32)),
        ValueError, r"cache_seqlens must be >= 0, got \[-1, 20\]",
    ),
    "block table dtype": (
        error_case(block_table=torch.tensor([[4, 0], [2, 1]])),
        TypeError, "block_table must be an int32 tensor, got torch.int64",
    ),
    "strided cache": (
        error_case(k_cache=torch.zeros(5, 16, 8, 2).transpose(2, 3)),
        ValueError, "k_cache and v_cache need a contiguous last dim",
    ),
    "dense batch": (
        error_case(block_table=None, k_cache=torch.zeros(3, 32, 2, 8),
                   v_cache=torch.zeros(3, 32, 2, 8)),
        ValueError, "A dense KV cache needs one row per sequence: q has 2, k_cache 3",
    ),
    "window": (error_case(window=(4,)), ValueError, "window must be None or a pair"),
    "sinks": (
        error_case(sinks=torch.zeros(3)), ValueError, r"sinks must have shape \(H,\) = \(4,\)",
    ),
    "max_seqlen_k below a length": (
        error_case(max_seqlen_k=20), ValueError,
        r"max_seqlen_k=20 is below the longest sequence: .* 1 new keys reach 21 keys",
    ),
    "max_seqlen_k negative": (error_case(max_seqlen_k=-1), ValueError, "must be >= 0, got -1"),
    "max_seqlen_k type": (
        error_case(max_seqlen_k=21.0), TypeError, "max_seqlen_k must be an int or None, got float",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", ERRORS)
def test_bad_input_raises_one_clear_sentence(name):
    kwargs, error, pattern = ERRORS[name]
    k_cache = kwargs["k_cache"].clone() if kwargs["k_cache"].device.type != "meta" else None
    with pytest.raises(error, match=pattern):
        attention_with_kvcache(**kwargs)
    if k_cache is not None:  # a refused call writes nothing
        assert torch.equal(kwargs["k_cache"], k_cache)


def test_block_ids_past_a_sequences_length_are_never_read():
    """Entries after the blocks a sequence uses may hold anything (flash-attn's padding)."""
    kwargs = error_case(block_table=torch.tensor([[4, 99], [2, 1]], dtype=torch.int32))
    want = attention_with_kvcache(**error_case())
    torch.testing.assert_close(attention_with_kvcache(**kwargs), want)


@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b != "triton"])  # float64
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("layout", ["dense", "page16", "page64"])
def test_random_lengths_match_float64_oracle(backend, seed, layout):
    """Seeded random lengths, Tq and Tnew; the first sequence empty, the second ending at the
    cache's end; on the backends that take float64."""
    page = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    t_new = int(torch.randint(0, 4, (), generator=g))
    t_q = max(1, t_new) if seed % 2 else int(torch.randint(1, 5, (), generator=g))
    top = capacity(page) - t_new
    lengths = [0, top] + torch.randint(0, top + 1, (B - 2,), generator=g).tolist()
    heads, kv_heads = HEADS[seed]
    for causal in (True, False):  # a fresh cache each: the call appends in place
        case = Case(page, lengths, t_q, t_new, heads, kv_heads, torch.float64, seed=seed)
        torch.testing.assert_close(
            case.run(causal=causal, backend=backend), case.oracle(causal, torch.float64), **F64
        )


@pytest.mark.parametrize("layout", ["dense", "page16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize(
    "window,softcap,sinks", [((3, 0), 0.0, False), ((-1, -1), 5.0, True), ((2, 1), 2.0, True)]
)
@pytest.mark.parametrize(
    "backend",  # in float64 (Triton's KV-cache variants: tests/test_variants.py, in fp32)
    [
        b
        for b in kvcache.KVCACHE_VARIANT_BACKENDS
        if b in fastgpt.available_backends("cpu") and b != "triton"
    ],
)
def test_variants_match_the_oracle_per_sequence(layout, causal, window, softcap, sinks, backend):
    """window / softcap / sinks on each sequence's own positions, against the independent
    variant oracle run on that sequence's logical keys, in float64."""
    page = LAYOUTS[layout]
    case = Case(page, lengths_before(page, 3), 3, 3, 4, 2, torch.float64)
    s = torch.randn(4, dtype=torch.float64) if sinks else None
    out = case.run(causal=causal, window=window, softcap=softcap, sinks=s, backend=backend)
    for b, end in enumerate(case.ends):
        q, k, v = (
            t.transpose(0, 1)[None] for t in (case.q[b], case.k_all[b, :end], case.v_all[b, :end])
        )
        want, _ = variant_oracle(q, k, v, causal, window, softcap, s)  # (1, H, Tq, D)
        torch.testing.assert_close(out[b], want[0].transpose(0, 1), **F64)


def test_variants_on_a_backend_without_them(debug_log):
    """An automatic pick moves to the reference, an explicit compiled backend raises."""
    case = Case(None, [0, 7, 9, 3], 1, 1, 4, 2, torch.float64)
    case.run(window=(4, 0))
    picked = kvcache.select_kvcache_backend(case.q.device)[0]
    if picked not in kvcache.KVCACHE_VARIANT_BACKENDS:
        assert any("has no window KV-cache kernel yet" in line for line in debug_log()), debug_log()
    for name in fastgpt.available_backends("cpu"):
        if name in kvcache.KVCACHE_KERNELS and name not in kvcache.KVCACHE_VARIANT_BACKENDS:
            with pytest.raises(NotImplementedError, match="does not implement softcap"):
                case.run(softcap=3.0, backend=name)
