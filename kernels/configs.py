"""Autotune configs per GPU family and head dim, and the pruning that keeps them launchable.

Each kernel has a table {family: {BLOCK_D: [(BLOCK_M, BLOCK_N, num_warps, num_stages), ...]}}.
At autotune time `prune_*` keeps the rows of the running GPU's family for the call's padded head
dim whose estimated shared memory fits the device (fp32 inputs need twice the bytes of fp16), so a
config that cannot launch is never tried. tests/test_triton_compile.py compiles every kept config
for sm_80 and sm_90 at every head-dim bucket and checks the real shared memory against the limits,
and that no 16-bit row spills registers or serializes wgmma (compile_check).
Under TRITON_INTERPRET=1 each kernel has one small config: tuning is meaningless there.
"""

import torch
import triton

from fastgpt.envflags import env_flag

INTERPRET = env_flag("TRITON_INTERPRET")  # the rule Triton applies (fastgpt.envflags)

# Shared memory per block (opt-in maximum) by compute capability; others are read off the device.
SMEM_LIMIT = {(8, 0): 166912, (9, 0): 232448}

_D_SMALL = (16, 32, 64)

# Every 16-bit row below compiles without register spills or serialized wgmma on its family at
# every head dim of its group (compile_check; the table in bench/NOTES_triton.md).
# Forward: BLOCK_M query rows resident, BLOCK_N keys streamed per step.
_FWD = {
    "hopper": {
        _D_SMALL: [(128, 128, 8, 3), (128, 64, 4, 4), (64, 64, 4, 4)],
        (128,): [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3)],
        (256,): [(128, 32, 8, 2), (64, 32, 8, 2)],
    },
    "ampere": {
        _D_SMALL: [(128, 64, 4, 3), (64, 64, 4, 3)],
        (128,): [(128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
        (256,): [(64, 64, 8, 2), (64, 32, 8, 2), (32, 32, 4, 2)],
    },
}
# dK/dV: BLOCK_N keys resident (k, v, dk, dv), BLOCK_M query rows streamed.
_DKDV = {
    "hopper": {
        _D_SMALL: [(32, 128, 8, 3), (32, 64, 4, 3)],
        (128,): [(16, 128, 8, 2), (16, 64, 8, 2)],
        (256,): [(32, 32, 8, 2), (16, 32, 8, 2), (32, 32, 8, 1)],
    },
    "ampere": {
        (16, 32): [(32, 128, 4, 3), (64, 64, 4, 3)],  # (32, 128, 8, 3) spills 40 B at D=16
        (64,): [(32, 128, 8, 3), (32, 64, 4, 3)],
        # (16, 64, 4, 2) spills 32 B once p's exponent is one fma (255 registers): (32, 32, 4, 2)
        (128,): [(32, 64, 8, 2), (64, 64, 8, 2), (16, 128, 8, 2), (32, 32, 4, 2)],
        (256,): [(32, 32, 8, 1), (16, 32, 8, 2)],
    },
}
# dQ: BLOCK_M query rows resident (q, dO, dq), BLOCK_N keys streamed.
_DQ = {
    "hopper": {
        _D_SMALL: [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3)],
        (128,): [(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3)],
        (256,): [(32, 32, 8, 2), (32, 16, 4, 2), (64, 16, 4, 2)],
    },
    "ampere": {
        _D_SMALL: [(128, 32, 4, 3), (64, 64, 4, 3)],
        (128,): [(128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 4, 2)],
        (256,): [(32, 16, 4, 2), (32, 32, 8, 1)],
    },
}
# One-pass backward (flash_bwd_onepass): as dK/dV (k, v, dk, dv resident, BLOCK_M query rows
# streamed) plus the (BLOCK_M, D) fp32 dq accumulator tile loaded, added to and stored per step.
# compile_check (bf16), causal and with the variants (non-causal, window, softcap): every wgmma row
# at D=128 spills on sm_90 (116-584 B), so D=128 keeps mma.sync 16 x 32 tiles there; on sm_80 the
# rows dropped spill 8-200 B (bench/NOTES_triton.md, change 9); sm_80 D=256 spills 232-264 B with
# a window (the only row; the two passes serve that case better).
_ONEPASS = {
    "hopper": {
        _D_SMALL: [(32, 128, 8, 2), (32, 64, 8, 2)],
        (128,): [(16, 32, 8, 2), (16, 32, 4, 2)],
        (256,): [(16, 32, 8, 2), (16, 32, 8, 1)],
    },
    "ampere": {
        (16, 32): [(16, 128, 8, 2)],
        (64,): [(16, 128, 8, 2), (16, 64, 8, 2)],
        (128,): [(16, 32, 8, 2)],
        (256,): [(16, 32, 8, 1)],
    },
}
# Decode: BLOCK_N keys per step for one group of query heads (memory-bound: deep pipelines).
_DECODE_ROWS = {
    _D_SMALL: [(16, 128, 4, 4), (16, 64, 4, 4)],
    (128,): [(16, 128, 4, 3), (16, 64, 4, 4)],
    (256,): [(16, 64, 4, 3), (16, 32, 4, 4)],
}
_DECODE = {"hopper": _DECODE_ROWS, "ampere": _DECODE_ROWS}
# KV-cache decode: BLOCK_M rows (GQA group x Tq, padded; more rows take more programs) against
# BLOCK_N keys per step. prune_kvcache keeps the rows of one BLOCK_M (kvcache_block_m). Clean on
# all three load paths (compile_check.PATHS); spilling 8-84 B and replaced: sm_90 D=32 16x128 and
# 32x64 at 4 warps (8 at D=32, 64; 8 spill at D=16), sm_80 D=32 16x64, D=64 64x64 at 4 warps,
# D=256 32x32 at 4.
_KVCACHE_128 = [(16, 128, 4, 3), (16, 64, 4, 4), (32, 64, 4, 3), (64, 64, 8, 3)]
_KVCACHE = {
    "hopper": {
        (16,): [(16, 128, 4, 4), (16, 64, 4, 4), (32, 64, 4, 4), (64, 64, 4, 3)],
        (32, 64): [(16, 128, 8, 4), (16, 64, 4, 4), (32, 64, 8, 4), (64, 64, 4, 3)],
        (128,): _KVCACHE_128,
        (256,): [(16, 64, 4, 3), (16, 32, 4, 4), (32, 32, 4, 3), (64, 32, 8, 2)],
    },
    "ampere": {
        _D_SMALL: [(16, 128, 4, 4), (32, 64, 4, 4), (64, 64, 8, 3)],
        (128,): _KVCACHE_128,
        (256,): [(16, 64, 4, 3), (16, 32, 4, 4), (32, 32, 8, 2), (64, 32, 8, 2)],
    },
}

# Rows whose varlen twin (IS_VARLEN) spills where the dense row does not: the sequence offsets and
# lengths live in registers there, not in kernel parameters, and these rows were already at 255
# registers (compile_check, bf16; spill bytes in the comments). The varlen autotune skips them.
# {(kind, family, BLOCK_D): [rows]}
VARLEN_SPILLS = {
    ("dkdv", "hopper", 128): [(16, 128, 8, 2)],  # 56 B (pointer path; descriptors clean)
    ("fwd", "ampere", 64): [(128, 64, 4, 3)],  # 8 B
    ("dkdv", "ampere", 64): [(32, 64, 4, 3)],  # 12 B
}

# Rows that spill registers or serialize wgmma with the attention variants on (WINDOW and / or
# SOFTCAP, sinks) where the plain row is clean (compile_check's table_variant_cases; bf16 and fp16
# alike; what each did in the comments, at the group's largest head dim unless said: W window,
# WS window + softcap, WSS + sinks). A call with any variant skips them at every head dim of the
# group, a varlen one VARLEN_VARIANT_SPILLS (and VARLEN_SPILLS) too, and tries VARIANT_ROWS as
# well where that leaves a group with nothing clean.
# {(kind, family, largest BLOCK_D of the group, the descriptor path): [rows]}
_HOPPER_FWD_128 = [(128, 128, 8, 3), (128, 128, 8, 2)]  # W 72 / 468 B, WSS 360 / 344 B
VARIANT_SPILLS = {
    # + C7515 (window: the masked left-edge loop before the pipelined one); W 8 B
    ("fwd", "hopper", 128, False): [*_HOPPER_FWD_128, (128, 64, 8, 3), (64, 64, 4, 3)],
    ("fwd", "hopper", 128, True): _HOPPER_FWD_128,  # WSS 148 B each (W clean)
    ("fwd", "hopper", 64, False): [(128, 64, 4, 4)],  # W 24 B
    ("dkdv", "hopper", 128, False): [(16, 128, 8, 2), (16, 64, 8, 2)],  # W 120 / 104, WS 136 / 112
    ("dkdv", "hopper", 128, True): [(16, 128, 8, 2), (16, 64, 8, 2)],  # W 132 / 56, WS 148 / 64
    ("dq", "hopper", 128, False): [(128, 64, 8, 2), (128, 32, 8, 3)],  # C7515 with the window
    ("dq", "hopper", 256, False): [(64, 16, 4, 2)],  # W: C7515 and 24 B; WS 128 B
    ("fwd", "ampere", 128, False): [(64, 64, 4, 3)],  # WSS 8 B
    ("dkdv", "ampere", 32, False): [(32, 128, 4, 3), (64, 64, 4, 3)],  # WS 40 / 72 B
    ("dkdv", "ampere", 64, False): [(32, 64, 4, 3)],  # WS 12 B
    ("fwd", "ampere", 256, False): [(64, 64, 8, 2)],  # WSS 8 B
    # WS at D=32 (not 64): ptxas caps it at 128 registers and spills 108 B (stages 3 alike); a
    # 17-32-row KV-cache call with a variant takes the 64-row tile instead
    ("kvcache", "hopper", 64, False): [(32, 64, 8, 4)],
}
VARLEN_VARIANT_SPILLS = {
    ("dkdv", "ampere", 256, False): [(32, 32, 8, 1)],  # WS 44 B (dense: clean)
}
VARIANT_ROWS = {
    ("fwd", "hopper", 128, False): [(64, 64, 4, 2)],
    ("dkdv", "hopper", 128, False): [(32, 32, 8, 2)],  # 32 keys: mma.sync, as at D=256
    ("dkdv", "hopper", 128, True): [(16, 64, 8, 1)],
    ("dkdv", "ampere", 32, False): [(32, 64, 4, 3)],
}

# Largest BLOCK_D that takes the tensor-descriptor path on sm_90 (compile_check: the dQ D=256
# tiles, 32 x 32 on mma.sync, spill 2-2.4 KB with descriptors and none without; dK/dV alike).
TMA_MAX_BLOCK_D = {"fwd": 256, "dq": 128, "dkdv": 128}
TABLES = {"fwd": _FWD, "dkdv": _DKDV, "dq": _DQ, "decode": _DECODE, "kvcache": _KVCACHE}
TABLES["onepass"] = _ONEPASS
_INTERPRET_ROW = {"fwd": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1)}
_INTERPRET_ROW["onepass"] = (16, 32, 4, 1)
_INTERPRET_ROW["decode"] = (16, 16, 4, 1)
_INTERPRET_ROW["kvcache"] = (16, 16, 4, 1)


def _config(row: tuple[int, int, int, int]) -> triton.Config:
    block_m, block_n, warps, stages = row
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, warps, stages)


def _decode_config(row: tuple[int, int, int, int]) -> triton.Config:
    return triton.Config({"BLOCK_N": row[1]}, row[2], row[3])


def _all_configs(kind: str) -> list[triton.Config]:
    make = _decode_config if kind == "decode" else _config
    if INTERPRET:
        return [make(_INTERPRET_ROW[kind])]
    rows = {r for family in TABLES[kind].values() for group in family.values() for r in group}
    return [make(r) for r in sorted(rows)]


FWD_CONFIGS = _all_configs("fwd")
DKDV_CONFIGS = _all_configs("dkdv")
DQ_CONFIGS = _all_configs("dq")
DECODE_CONFIGS = _all_configs("decode")
KVCACHE_CONFIGS = _all_configs("kvcache")
ONEPASS_CONFIGS = _all_configs("onepass")


def estimate_smem(kind: str, row: tuple[int, int, int, int], block_d: int, elem: int) -> int:
    """Bytes of shared memory a config may need: an upper estimate for GPUs and element sizes the
    compile test does not measure (it held on every sm_80 / sm_90 measurement so far)."""
    bm, bn, _, stages = row
    scratch = 4 * bm * bn + 2048  # p / ds staged for the second dot, layout conversions, barriers
    if kind in ("fwd", "decode", "kvcache"):  # q resident; k, v tiles per pipeline stage
        return elem * (bm * block_d + 2 * stages * bn * block_d + scratch)
    if kind == "dkdv":  # k, v resident; q, dO tiles per stage
        return elem * (2 * bn * block_d + 2 * stages * bm * block_d + scratch)
    if kind == "onepass":  # as dK/dV, plus the fp32 dq accumulator tile per stage
        return (
            elem * (2 * bn * block_d + 2 * stages * bm * block_d + scratch)
            + 4 * stages * bm * block_d
        )
    # dq: q, dO resident; k, v tiles per stage
    return elem * (2 * bm * block_d + 2 * stages * bn * block_d + scratch)


def family(capability: tuple[int, int]) -> str:
    return "hopper" if capability[0] >= 9 else "ampere"


def _clean_rows(rows: list, key: tuple, peak: int, varlen: bool, variants: bool, tma: bool) -> list:
    """`rows` less the spill lists that apply to a call (key: kind, family, BLOCK_D; the variant
    lists are keyed by the largest head dim of the row group, `peak`, and hold for the group)."""
    path = (*key[:2], peak, tma)
    spills = [
        *(VARLEN_SPILLS.get(key, []) if varlen else []),
        *(VARIANT_SPILLS.get(path, []) if variants else []),
        *(VARLEN_VARIANT_SPILLS.get(path, []) if varlen and variants else []),
    ]
    extra = VARIANT_ROWS.get(path, []) if variants else []
    return [r for r in rows if r not in spills] + extra


def select_rows(
    kind: str,
    capability: tuple[int, int],
    block_d: int,
    elem: int,
    smem_limit: int,
    varlen: bool = False,
    variants: bool = False,
    tma: bool = False,
) -> list[tuple[int, int, int, int]]:
    """The configs autotune may try on one GPU for one padded head dim and element size.

    16-bit inputs on sm_80 / sm_90: the whole table row group (the compile test measures every
    one), less VARLEN_SPILLS for the varlen kernels, and for a call with an attention variant
    (window, softcap, sinks) less VARIANT_SPILLS of its load path (`tma`: tensor descriptors) plus
    VARIANT_ROWS. Other GPUs: the rows whose estimate fits
    their shared memory. fp32 inputs (a correctness path: full-precision dots compile slowly) get
    a single small config.
    """
    table = TABLES[kind][family(capability)]
    dims, rows = next((dims, group) for dims, group in table.items() if block_d in dims)
    if varlen or variants:
        key = (kind, family(capability), block_d)
        rows = _clean_rows(rows, key, max(dims), varlen, variants, tma)
    measured = SMEM_LIMIT.get(capability)
    if elem == 2 and measured is not None and smem_limit >= measured:
        return rows
    if elem == 4:
        # Small tiles: full-precision fp32 dots unroll into FMAs, and big tiles take ~30 s each
        # to compile (measured on sm_80) for a path that is about accuracy, not speed.
        row = (16, 32, 4, 1) if kind in ("decode", "kvcache") else (32, 32, 4, 1)
        return [row if estimate_smem(kind, row, block_d, elem) <= smem_limit else (16, 16, 4, 1)]
    fits = [r for r in rows if estimate_smem(kind, r, block_d, elem) <= smem_limit]
    if fits:
        return fits
    # Nothing fits (a small-smem GPU at D=256): the smallest tile, one stage.
    bm, bn, warps, _ = min(rows, key=lambda r: r[0] * r[1])
    return [(bm, bn, warps, 1)]


def _device_limits(t: torch.Tensor) -> tuple[tuple[int, int], int]:
    capability = torch.cuda.get_device_capability(t.device)
    limit = SMEM_LIMIT.get(capability)
    if limit is None:
        props = torch.cuda.get_device_properties(t.device)
        limit = getattr(props, "shared_memory_per_block_optin", 101376)
    return capability, limit


def uses_variants(args: dict) -> bool:
    """Whether a launch's arguments switch an attention variant on (WINDOW, SOFTCAP, Sinks)."""
    on = bool(args.get("WINDOW", False)) or bool(args.get("SOFTCAP", False))
    return on or args.get("Sinks") is not None


def _make_prune(kind: str, tensor_arg: str):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        t = args[tensor_arg]
        capability, limit = _device_limits(t)
        varlen = bool(args.get("IS_VARLEN", False))
        variants, tma = uses_variants(args), bool(args.get("USE_TMA", False))
        elem = t.element_size()
        rows = select_rows(kind, capability, args["BLOCK_D"], elem, limit, varlen, variants, tma)
        make = _decode_config if kind == "decode" else _config
        return [make(r) for r in rows]

    return prune


prune_fwd = _make_prune("fwd", "Q")
prune_dkdv = _make_prune("dkdv", "Q")
prune_dq = _make_prune("dq", "Q")
prune_onepass = _make_prune("onepass", "Q")
prune_decode = _make_prune("decode", "Q")
_prune_kvcache_rows = _make_prune("kvcache", "Q")


def kvcache_block_m(m_rows: int, block_ms: list[int]) -> int:
    """The tile height for m_rows = GROUP * Tq query rows: the smallest of block_ms that holds
    them all, else the largest (the rows then take several programs)."""
    fits = [m for m in sorted(block_ms) if m >= m_rows]
    return fits[0] if fits else max(block_ms)


def prune_kvcache(configs, named_args, **kwargs):
    """prune_decode's rows for the KV-cache kernel, then only those of one BLOCK_M."""
    kept = _prune_kvcache_rows(configs, named_args, **kwargs)
    m_rows = {**named_args, **kwargs}["M_ROWS"]
    block_m = kvcache_block_m(m_rows, [c.kwargs["BLOCK_M"] for c in kept])
    return [c for c in kept if c.kwargs["BLOCK_M"] == block_m]
