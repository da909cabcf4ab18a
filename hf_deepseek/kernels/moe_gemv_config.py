"""The launch configurations of the decode kernels (the matrix-vector kernels of `moe_gemv.py`, the expert-grouped
ones of `moe_grouped_gemv.py`, the rows kernel of `linear_rows.py`): what both the ops and the Triton launchers
read, below both."""

import os
from typing import NamedTuple


class KernelConfig(NamedTuple):
    """The Triton kernels' launch configuration (`_moe_gemv_triton.launch`'s `config`): rows per program, K per
    loop step, warps, K chunks (split-K: a third grid axis, each chunk's fp32 partial sums stored and summed in a
    fixed order, so a launch repeats bit for bit) and software pipelining stages of the K loop
    (None: Triton's default loop, the kernels as first written)."""

    block_n: int = 32
    block_k: int = 256
    warps: int = 4
    split_k: int = 1
    stages: int | None = None


def parse_config(text: str | None) -> KernelConfig | None:
    """ "BLOCK_N,BLOCK_K,WARPS[,SPLIT_K[,STAGES]]" (as HF_DEEPSEEK_MOE_GEMV_CONFIG gives it; STAGES "none" or left
    out: Triton's default loop) -> KernelConfig; None or "" -> None."""
    fields = _fields(text, 3, 2, "BLOCK_N,BLOCK_K,WARPS[,SPLIT_K[,STAGES]]")
    if fields is None:
        return None
    block_n, block_k, warps = fields[:3]
    split_k = fields[3] if len(fields) > 3 else 1
    return kernel_config((block_n, block_k, warps, split_k, fields[4] if len(fields) > 4 else None))


def _fields(text: str | None, required: int, optional: int, form: str) -> list[int | None] | None:
    """Comma-separated integers, `required` of them and up to `optional` more, the last of those (STAGES) possibly
    "none"; None or "" -> None."""
    if not text or not text.strip():
        return None
    fields = [f.strip() for f in text.split(",")]
    last = required + optional - 1
    try:
        if not required <= len(fields) <= required + optional:
            raise ValueError
        return [None if i == last and f.lower() == "none" else int(f) for i, f in enumerate(fields)]
    except ValueError:
        raise ValueError(f"expected {form} (integers, the last may be none), got {text!r}") from None


def kernel_config(
    config=None, fp8: bool = False, linear: bool = False, head: bool = False, down: bool = False
) -> KernelConfig:
    """A tuple (BLOCK_N, BLOCK_K, WARPS[, SPLIT_K[, STAGES]]) or KernelConfig, or None for the default of the
    experts (`CONFIG`, or `FP8_CONFIG` for FP8 weights; with `down`, their down kernel's `DOWN_CONFIG`,
    `FP8_DOWN_CONFIG`) or, with `linear`, of the dense layers (`LINEAR_CONFIG`, `LINEAR_FP8_CONFIG`; with `head` too,
    an FP8 LM head's `HEAD_FP8_CONFIG`), checked: powers of two for the blocks and warps, SPLIT_K >= 1, STAGES None
    or >= 1."""
    cfg = KernelConfig(*(_default_config(fp8, linear, head, down) if config is None else config))
    _powers_of_two(cfg, ("block_n", "block_k", "warps"))
    if cfg.split_k < 1 or (cfg.stages is not None and cfg.stages < 1):
        raise ValueError(f"split_k must be >= 1 and stages None or >= 1: {cfg}")
    return cfg


def _default_config(fp8: bool, linear: bool, head: bool, down: bool) -> KernelConfig:
    """The module's configuration for a kernel kind; read only when asked for, since parsing the environment's
    configurations at import (`config_from_env`) checks them here before these names exist."""
    if linear and fp8 and head:
        return HEAD_FP8_CONFIG
    if linear:
        return LINEAR_FP8_CONFIG if fp8 else LINEAR_CONFIG
    if down:
        return FP8_DOWN_CONFIG if fp8 else DOWN_CONFIG
    return FP8_CONFIG if fp8 else CONFIG


def launch_options(warps: int, stages: int | None) -> dict:
    """Triton launch options of a configuration: its warps and, unless None (Triton's default), its stages."""
    return dict(num_warps=warps) if stages is None else dict(num_warps=warps, num_stages=stages)


# Programmatic dependent launch of the batch-1 decode kernels (`_pdl_triton`: the next kernel launches while this one
# runs, and prefetches its weights while it waits): opt-in with HF_DEEPSEEK_PDL=1, its replayed step 1.14 ms against
# 1.12 at batch 1 / 2k and 3.98 against 4.05 at batch 32 (bench row `ours-fast-pdl`, H100, docs/PERF.md
# 2026-12-05g); SM90 and later only
PDL = os.environ.get("HF_DEEPSEEK_PDL", "0") == "1"


def pdl_on(device) -> bool:
    """Whether the decode kernels launch with PDL on `device`: `PDL`, on a CUDA device of compute capability 9+."""
    import torch

    return PDL and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _powers_of_two(cfg: NamedTuple, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two, got {value}")


def split_chunk(k: int, split_k: int, block_k: int) -> int:
    """The K each program of a split-K launch covers: K / split_k rounded up to whole BLOCK_K steps (so chunks
    start on step boundaries and cdiv(k, chunk) <= split_k programs cover K)."""
    steps = -(-k // block_k)
    return -(-steps // split_k) * block_k


# Measured on one H200 (`benchmarks/moe_gemv_tune.py --quick`, 2026-12-04, docs/PERF.md): 16 rows a program with a
# 3-stage pipelined K loop reads bf16 experts 1.4-2.5x faster than the first-written (32, 256, 4) from 4 to 32
# token-expert pairs and 1.93x at one token x top-6 (34 against 66 us); within 0.1 us of the best at 8 pairs and
# above.
TUNED_BF16 = KernelConfig(16, 256, 4, 1, 3)
# FP8 experts (`moe_gemv_tune.py --quick --fp8 --down`, H100, 2026-12-06e): at 8 pairs (a batch-1 step's: one
# token's top-6 and the two shared experts folded in, 69.2 MB) gate/up whole and the down kernel in two K chunks read
# at 2.07 TB/s, 84% of copy; in the step 0.69 ms against 0.72 with both kernels in two chunks, the tune's choice for
# top-6 without the shared experts (FP8 LM head, H100, 2026-12-06g, one call).
TUNED_FP8 = KernelConfig(32, 256, 4, 1, None)
TUNED_FP8_DOWN = KernelConfig(32, 256, 4, 2, None)
# The dense layers' decode rows (`moe_gemv_tune.py --linear --quick`, H200, 2026-12-04g): the configuration with the
# least time over every dense matrix-vector product of a batch-1 step, 232 us for bf16 weights against cuBLAS's 330
# (1.13-2.13x cuBLAS on each shape) and 358 us for FP8 weights (1.0-2.0x the first-written on each shape).
# Re-measured on an H100 (2026-12-06e, `--linear --quick --head`), whole rows of K in 2048-wide steps: FP8 weights 4
# rows a program, 251 us over a step's dense layers (1.5-2.2x cuBLAS bf16 on each shape, 1.0-2.0x before), bf16 2
# rows, 320 us against cuBLAS's 414 (a batch-1 / 2k step 0.98 against 1.01 ms with (8, 256, 4, 1, 3), H100
# 2026-12-06f).
TUNED_LINEAR_BF16 = KernelConfig(2, 2048, 4, 1, None)
TUNED_LINEAR_FP8 = KernelConfig(4, 2048, 4, 1, None)


# The kernels' launch configurations, read at import: the measured ones, or from the environment (for benches and
# tuning runs) as "BLOCK_N,BLOCK_K,WARPS[,SPLIT_K[,STAGES]]": HF_DEEPSEEK_MOE_GEMV_CONFIG for the experts, bf16 and
# FP8 weights alike, unless HF_DEEPSEEK_MOE_GEMV_FP8_CONFIG sets FP8's; the dense layers' matrix-vector products
# (`launch_linear`) take their own tuned ones unless HF_DEEPSEEK_LINEAR_GEMV_CONFIG / HF_DEEPSEEK_LINEAR_GEMV_FP8_CONFIG
# set them (their shapes differ from the experts': `benchmarks/moe_gemv_tune.py --linear` measures them).
def config_from_env(
    environ=os.environ, default: KernelConfig = TUNED_BF16, names=("HF_DEEPSEEK_MOE_GEMV_CONFIG",), parse=None
) -> KernelConfig:
    """The first of the variables `names` that is set, parsed (by `parse`, default `parse_config`); else `default`."""
    parse = parse or parse_config
    return next((parse(environ[n]) for n in names if environ.get(n, "").strip()), default)


CONFIG: KernelConfig = config_from_env()
FP8_CONFIG: KernelConfig = config_from_env(
    default=TUNED_FP8, names=("HF_DEEPSEEK_MOE_GEMV_FP8_CONFIG", "HF_DEEPSEEK_MOE_GEMV_CONFIG")
)
# The experts' down kernel apart from their gate/up kernel (its K is the experts' width, 1408 at the bench's shapes,
# against gate/up's 2048, and its rows the hidden size): bf16 the experts' configuration, FP8 its own (TUNED_FP8_DOWN).
# HF_DEEPSEEK_MOE_GEMV_DOWN_CONFIG sets both kinds', unless HF_DEEPSEEK_MOE_GEMV_FP8_DOWN_CONFIG sets FP8's; a variable
# that sets the experts' configuration and no down one sets the down kernel's too.
DOWN_CONFIG: KernelConfig = config_from_env(default=CONFIG, names=("HF_DEEPSEEK_MOE_GEMV_DOWN_CONFIG",))
FP8_DOWN_NAMES = ("HF_DEEPSEEK_MOE_GEMV_FP8_DOWN_CONFIG", "HF_DEEPSEEK_MOE_GEMV_DOWN_CONFIG")
FP8_DOWN_CONFIG: KernelConfig = config_from_env(
    default=TUNED_FP8_DOWN, names=(*FP8_DOWN_NAMES, "HF_DEEPSEEK_MOE_GEMV_FP8_CONFIG", "HF_DEEPSEEK_MOE_GEMV_CONFIG")
)
LINEAR_CONFIG: KernelConfig = config_from_env(default=TUNED_LINEAR_BF16, names=("HF_DEEPSEEK_LINEAR_GEMV_CONFIG",))
LINEAR_FP8_CONFIG: KernelConfig = config_from_env(
    default=TUNED_LINEAR_FP8, names=("HF_DEEPSEEK_LINEAR_GEMV_FP8_CONFIG",)
)
# An LM head quantised to FP8 (`convert_to_fp8_inference` with `FP8Recipe(skip=())`): a [vocab, hidden] matrix 30-90x
# the dense layers' in bytes, whose decode rows took 152 us for 265 MB (1.75 TB/s, H100, docs/PERF.md 2026-12-06) at
# the dense layers' configuration then. Linear layers of at least HEAD_MIN_ROWS output rows take a configuration of
# their own, measured by `moe_gemv_tune.py --linear --head` (H100, 2026-12-06e: 85.6 us at one token, 3.1 TB/s, against
# cuBLAS bf16's 178 us for twice the bytes); HF_DEEPSEEK_HEAD_GEMV_FP8_CONFIG sets it.
HEAD_MIN_ROWS = 32768
TUNED_HEAD_FP8 = KernelConfig(8, 1024, 4, 1, None)
HEAD_FP8_CONFIG: KernelConfig = config_from_env(default=TUNED_HEAD_FP8, names=("HF_DEEPSEEK_HEAD_GEMV_FP8_CONFIG",))


class GroupedConfig(NamedTuple):
    """The expert-grouped kernels' launch configuration (`_moe_grouped_gemv_triton.launch`): an expert's
    token-expert pairs taken BLOCK_T at a time (16 or more: tensor-core `tl.dot`, whose smallest tile has 16 rows;
    fewer: a broadcast multiply and sum on the CUDA cores), weight rows per program, K per loop step, warps and
    software pipelining stages of the K loop (None: Triton's default loop). FP8 weights need BLOCK_N and BLOCK_K
    dividing 128: each step's weight tile then lies in one 128x128 block, its scale one number."""

    block_t: int = 16
    block_n: int = 32
    block_k: int = 128
    warps: int = 4
    stages: int | None = None


def grouped_config(config=None, fp8: bool = False) -> GroupedConfig:
    """A tuple (BLOCK_T, BLOCK_N, BLOCK_K, WARPS[, STAGES]) or GroupedConfig, or None for `GROUPED_CONFIG`
    (`GROUPED_FP8_CONFIG` for FP8 weights), checked."""
    cfg = GroupedConfig(*((GROUPED_FP8_CONFIG if fp8 else GROUPED_CONFIG) if config is None else config))
    _powers_of_two(cfg, ("block_t", "block_n", "block_k", "warps"))
    if cfg.stages is not None and cfg.stages < 1:
        raise ValueError(f"stages must be None or >= 1: {cfg}")
    if cfg.block_t >= 16 and min(cfg.block_n, cfg.block_k) < 16:
        raise ValueError(f"tl.dot (BLOCK_T >= 16) needs BLOCK_N and BLOCK_K >= 16: {cfg}")
    if fp8 and (128 % cfg.block_n or 128 % cfg.block_k):
        raise ValueError(f"FP8 weights need BLOCK_N and BLOCK_K dividing the 128x128 scale blocks: {cfg}")
    return cfg


def parse_grouped_config(text: str | None) -> GroupedConfig | None:
    """ "BLOCK_T,BLOCK_N,BLOCK_K,WARPS[,STAGES]" -> GroupedConfig (STAGES "none" or left out: Triton's default
    loop); None or "" -> None. Checked as for bf16 weights (the launcher checks FP8's constraints)."""
    fields = _fields(text, 4, 1, "BLOCK_T,BLOCK_N,BLOCK_K,WARPS[,STAGES]")
    return None if fields is None else grouped_config(tuple(fields))


# The fastest of the quick sweep at batch 32 (top-6 of 64 experts at the bench's shapes) for both weight kinds on
# an H200 (`benchmarks/moe_gemv_tune.py --grouped-kernels --quick [--fp8]`, docs/decode-h200/, 2026-12-04h):
# 16 pairs a chunk, 64 weight rows a program, tl.dot, a 3-stage pipelined K loop; 280 us bf16 / 207 us FP8 a layer.
# HF_DEEPSEEK_MOE_GROUPED_GEMV_CONFIG sets both kinds' as "BLOCK_T,BLOCK_N,BLOCK_K,WARPS[,STAGES]", unless
# HF_DEEPSEEK_MOE_GROUPED_GEMV_FP8_CONFIG sets FP8's.
TUNED_GROUPED = GroupedConfig(16, 64, 128, 4, 3)


def grouped_configs_from_env(default: GroupedConfig, name: str) -> tuple[GroupedConfig, GroupedConfig]:
    """(bf16, FP8) configurations: `default`, unless the variable `name` sets both or `name` with _FP8 before
    _CONFIG sets FP8's."""
    fp8_name = name.removesuffix("_CONFIG") + "_FP8_CONFIG"
    bf16 = config_from_env(default=default, names=(name,), parse=parse_grouped_config)
    return bf16, config_from_env(default=default, names=(fp8_name, name), parse=parse_grouped_config)


GROUPED_CONFIG, GROUPED_FP8_CONFIG = grouped_configs_from_env(TUNED_GROUPED, "HF_DEEPSEEK_MOE_GROUPED_GEMV_CONFIG")


# The rows kernel (`linear_rows.py`: a linear layer's few dozen decode rows against its bf16 or FP8 weight, read
# once) takes the grouped kernels' fields (activation rows a program, weight rows, K step, warps, stages) and, for FP8
# weights, their FP8 constraints. The untuned default, also the fastest of `moe_gemv_tune.py --linear-rows` over a
# batch-32 step's dense layers on an H200 (docs/PERF.md 2026-12-05): 32 rows a program (a decode batch of 32 in one
# tl.dot tile), 16 weight rows a program (96 to 192 programs for N = 1536..3072 on the H200's 132 SMs), a 128-wide K
# step (one scale block), a 3-stage K loop. HF_DEEPSEEK_LINEAR_ROWS_CONFIG sets both kinds' as
# "BLOCK_T,BLOCK_N,BLOCK_K,WARPS[,STAGES]", unless HF_DEEPSEEK_LINEAR_ROWS_FP8_CONFIG sets FP8's.
UNTUNED_LINEAR_ROWS = GroupedConfig(32, 16, 128, 4, 3)
LINEAR_ROWS_CONFIG, LINEAR_ROWS_FP8_CONFIG = grouped_configs_from_env(
    UNTUNED_LINEAR_ROWS, "HF_DEEPSEEK_LINEAR_ROWS_CONFIG"
)


def linear_rows_config(config=None, fp8: bool = False) -> GroupedConfig:
    """A tuple (BLOCK_T, BLOCK_N, BLOCK_K, WARPS[, STAGES]) or GroupedConfig, or None for `LINEAR_ROWS_CONFIG`
    (`LINEAR_ROWS_FP8_CONFIG` for FP8 weights), checked as `grouped_config` checks it (FP8: BLOCK_N and BLOCK_K
    dividing the 128x128 scale blocks)."""
    default = LINEAR_ROWS_FP8_CONFIG if fp8 else LINEAR_ROWS_CONFIG
    return grouped_config(default if config is None else config, fp8=fp8)


def prefetch_lines(k: int, element_size: int, cap: int = 64) -> tuple[int, int]:
    """(LINES, LINE) for `_pdl_triton.pdl_start` over a K of `k` elements of `element_size` bytes: LINE elements a
    128-byte line, LINES the largest power of two of lines within K, at most `cap`."""
    line = max(1, 128 // element_size)
    lines = max(1, min(cap, k // line))
    return 1 << (lines.bit_length() - 1), line


def pdl_arguments(device, k: int = 0, element_size: int = 2) -> dict:
    """A launch's arguments for a kernel that calls `_pdl_triton.pdl_start` or `pdl_wait`: with PDL on for `device`
    (`pdl_on`), PDL, `launch_pdl` and, given a K of `k` elements of `element_size` bytes to
    prefetch, LINES and LINE; nothing otherwise (the kernels compile as without PDL)."""
    if not pdl_on(device):
        return {}
    if not k:
        return dict(PDL=True, launch_pdl=True)
    lines, line = prefetch_lines(k, element_size)
    return dict(PDL=True, launch_pdl=True, LINES=lines, LINE=line)
