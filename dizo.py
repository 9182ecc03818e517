"""Zeroth-order fine-tuning: ZO-SGD with seed replay (MeZO) and DiZO's layer-wise divergence projection.

This module depends on torch alone; copy it into any project. Read it beside the papers:
  MeZO  -- Malladi et al., "Fine-Tuning Language Models with Just Forward Passes", arXiv 2305.17333;
           released code: princeton-nlp/MeZO, large_models/trainer.py.
  DiZO  -- Tan et al., "Harmony in Divergence: Towards Fast, Accurate, and Memory-efficient Zeroth-order
           LLM Fine-tuning", arXiv 2502.03304 (NeurIPS 2025); released code: Skilteee/DiZO,
           large_models/trainer.py (a fork of MeZO's).

Equation map (sections and equations of the DiZO paper)
  z ~ N(0, I) (or ±1), regenerated tensor by tensor from a seed   ZOSGD._zs, ZOSGD._pass_   MeZO's seed replay
  g_j = (L(θ + εz_j) - L(θ - εz_j)) / (2ε), j = 1..q               ZOSGD._query              §2.1 eq. (1)
  θ <- θ - η ((1/q) Σ_j g_j z_j + λ θ), restore and update fused   ZOSGD._update_            §2.1 eq. (2)
  half precision: the same steps on an fp32 master                 ZOSGD._values
  Δ_l = θ_l - θ0_l,  s_l = ||Δ_l||_F  (the layer-wise divergence)  DiZO.distances            §2.2
  the same, logged for any model's attention matrices              divergence                §2.2
  θ_l <- θ0_l + (γ_l / s_l) Δ_l = θ0_l + r_l Δ_l                   DiZO._set_ratios_         §3, projection
  γ search: SPSA on per-matrix scalars, u clipped, r in [1-τ, 1+τ]  DiZO._search_ratios       §3, as trainer.py
  every κ ZO steps, M search iterations on fresh mini-batches      DiZO.step, DiZO.project   §3, as trainer.py
  which matrices: attention K and V (or their LoRA factors)        projected_params          as trainer.py

Usage (the README has a complete, tested example):

    opt = DiZO(model.parameters(), projected_params(model), lr=1e-6,
               search_data=loader, search_loss=lambda batch: loss_fn(model, batch))
    for batch in loader:
        loss = opt.step(lambda: loss_fn(model, batch))   # the loss of ONE mini-batch: no backward

ZOSGD takes the same step(closure), without `projected`, `search_data` and `search_loss`.

What the closure may do, and what a step guarantees:
  - It returns one scalar loss (a 0-dim tensor or a number), differentiable or not (an error rate works).
    It runs under torch.no_grad(): it must not call backward().
  - Dropout may be on. Both forward passes of a step see the same global RNG state (torch's CPU generator and
    that of every CUDA device holding parameters are saved before ℓ+ and restored before ℓ-), so in train mode
    they draw the same dropout masks and g is the directional derivative of the loss with that mask. After the
    step the global RNG is where ONE closure call leaves it. (MeZO's and DiZO's code evaluate in eval mode.)
  - If the closure raises anything (KeyboardInterrupt included) or returns something that is not one finite
    scalar, θ is put back by replaying z before the error reaches the caller, and a note on the error says
    how close: replaying z restores θ up to float rounding (bounded, and reported), not bit for bit, since
    that would need a copy of the model. A projection phase restores its matrices exactly, from a copy.
  - group["lr"] is read at every step, so torch.optim.lr_scheduler works. ZO-SGD has no momentum:
    OneCycleLR and CyclicLR need cycle_momentum=False.
"""

import functools
import math
import numbers
import os
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import torch

__all__ = ["ZOSGD", "DiZO", "divergence", "projected_params", "projection_report"]

Loss = torch.Tensor | float
Closure = Callable[[], Loss]
Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]]
Projected = Sequence[torch.Tensor | tuple[str, torch.Tensor]]


def _check(name, value, ok, why):
    if not ok:
        raise ValueError(f"{name} must be {why}, got {value!r}")


def _note(error, text):
    """Attach `text` to an exception that is propagating (shown under its traceback; Python >= 3.11)."""
    if hasattr(error, "add_note"):
        error.add_note(text)


def _require_closure(closure):
    if not callable(closure):
        raise TypeError(f"step(closure) needs a function that returns the loss, e.g. "
                        f"lambda: loss_fn(model, batch); got {type(closure).__name__}")


def _scalar(value, where):
    """The closure's value as a float; anything but one scalar loss is an error saying what came back."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"the closure returned a tensor of shape {tuple(value.shape)} at {where}; it must "
                             f"return one scalar loss (reduce a per-example loss, e.g. with .mean())")
        return float(value)
    if isinstance(value, numbers.Real):
        return float(value)
    got = "None" if value is None else f"a {type(value).__name__}"
    raise TypeError(f"the closure returned {got} at {where}; it must return the loss as a scalar tensor "
                    f"or a number")


class _GlobalRNG:
    """The global torch RNG state (CPU, and every CUDA device among `devices`), saved now to be replayed:
    the second forward pass then draws the same dropout masks as the first."""

    def __init__(self, devices):
        self.cpu = torch.get_rng_state()
        self.cuda = {d: torch.cuda.get_rng_state(d) for d in devices if d.type == "cuda"}

    def replay(self):
        torch.set_rng_state(self.cpu)
        for device, state in self.cuda.items():
            torch.cuda.set_rng_state(state, device)


# Half precision. A bf16 or fp16 tensor updated in place loses every change smaller than half its resolution
# (bf16 keeps 8 significant bits: a change below ~0.2% of a weight rounds away), and each ±εz pass rounds,
# so θ drifts even at lr 0. Under half_precision="exact" the optimizer keeps the fp32 value θ* of such a
# tensor, does every pass on it in fp32 with z drawn in fp32, and writes back θ = θ* rounded to nearest:
#   bf16: θ* = (bits(θ) << 16) + low, with `low` an int16 companion: the bf16 tensor is the high half of its
#         fp32 master, so a bf16 parameter costs 2 + 2 bytes, and the master follows fp32 ZOSGD bit for bit.
#   fp16: an fp32 master copy, 2 + 4 bytes: fp16 (5 exponent bits) is not the high half of an fp32 number.
#         fp32 weights with the forward under torch.autocast(dtype=torch.float16) cost 4 bytes.
_HALF = (torch.bfloat16, torch.float16)
# Elements of a bf16 tensor rebuilt in fp32 at a time: on a CPU an int32 block that stays in cache (2^18
# was fastest here: 4.4 ns per parameter and pass against 7.4 for whole tensors, 1 thread); on a GPU each
# block costs 8 kernel launches, so blocks are large (2^24: 64 MiB of scratch).
_BLOCK = {"cpu": 1 << 18}
_BLOCK_ELSEWHERE = 1 << 24


def _block(device):
    return _BLOCK.get(device.type, _BLOCK_ELSEWHERE)


def _join_bf16(hi, low, bits):
    """The fp32 value whose high half is the bf16 tensor `hi` and low half the int16 `low`, built in `bits`
    (int32): bits = (hi << 16) + low. Exact."""
    return bits.copy_(hi.view(torch.int16)).bitwise_left_shift_(16).add_(low).view(torch.float32)


def _round_bf16_(bits, hi):
    """hi <- the fp32 value in `bits` (int32) rounded to the nearest bf16, ties away from zero. Overwrites
    `bits`."""
    hi.view(torch.int16).copy_(bits.add_(0x8000).bitwise_right_shift_(16))  # + half a bf16 unit, keep 16 bits


def _split_bf16_(bits, hi, low):
    """hi <- the fp32 value in `bits` (int32) rounded to the nearest bf16, low <- the rest, so that
    _join_bf16 gives the value back exactly. bits = (hi << 16) + low with low in [-2^15, 2^15) makes low
    the low 16 bits of `bits` read as int16. Overwrites `bits`."""
    low.copy_(bits)  # int32 -> int16 keeps the low 16 bits
    _round_bf16_(bits, hi)


def _row_blocks(*tensors):
    """The same blocks of rows of each of `tensors` (shaped alike), about _block(device) elements each."""
    tensors = [x.view(1) if x.dim() == 0 else x for x in tensors]
    rows = max(1, _block(tensors[0].device) // max(1, tensors[0][0].numel())) if tensors[0].numel() else 1
    return zip(*(x.split(rows) for x in tensors))


# Directions. "gaussian" (MeZO, DiZO): z ~ N(0, I) by normal_, one call per tensor. "rademacher" (Spall's
# SPSA): z_i = ±1, one random bit each: a tensor of n entries takes ceil(n/64) random 64-bit words from the
# generator, z_i = +1 where bit i of their little-endian bytes is 0 and -1 where it is 1, and a lookup table
# turns each byte into its 8 signs. Both have E[z zᵀ] = I, so E[g z] = ∇L; with a = ∇L the covariance of g z
# is ||a||² I + a aᵀ for Gaussian z and ||a||² I + a aᵀ - 2 diag(a²) for Rademacher z (total variance
# (d + 1)||a||² against (d - 1)||a||²), and a Rademacher perturbation has ||εz|| = ε√d exactly. On a CPU the
# signs are far cheaper to draw than normal_ (bench.py times both steps).
_DIRECTIONS = ("gaussian", "rademacher")
_SIGN_BLOCK = 1 << 20  # random bytes turned into signs at a time: bounds the int32 index scratch to 4 MiB

# Gaussian z on a CPU. torch's CPU generator (mt19937) is sequential and normal_ runs on one core: drawn from
# one generator, z is most of a ZO step's own work and leaves every other core idle (bench.py --profile). So a
# tensor of more than _CPU_CHUNK entries takes one 62-bit seed s from the pass's generator and is cut into
# chunks of _CPU_CHUNK entries, chunk k drawn by its own generator seeded with s + k; smaller tensors, too
# small to be worth a thread, are drawn from the pass's generator itself, in order. (A model whose tensors
# all have at most 2^16 entries thus sees the z of one generator, as MeZO's code draws it; a larger tensor's
# z is another stream.) The chunks are shared out among torch.get_num_threads() threads in contiguous runs,
# and z does not depend on how many. Each thread also applies its chunk (θ += αz) while the chunk is in its
# cache, so a large tensor's z is never held whole: no scratch buffer the size of the largest tensor, and no
# pass over memory to add it. The threads run torch's ops on one core each, as does the calling thread
# during the pass: after a parallel op, OpenMP's idle workers spin for a while on the cores the drawing
# threads need. Rademacher z of a large tensor goes the same way with its stream unchanged: the pass's
# generator draws the tensor's random words, and each thread turns its chunks' words into signs and applies
# them. On a GPU one generator (Philox) already draws in parallel: z is drawn tensor by tensor.
_CPU_CHUNK = 1 << 16  # 256 KiB of fp32: stays in a core's cache between normal_'s sweeps and the add
# Rademacher z is cut at whole words: a chunk takes _CPU_CHUNK/64 words, a block of _signs_ _SIGN_BLOCK/8
assert _CPU_CHUNK % 64 == 0 and _SIGN_BLOCK % 8 == 0
_POOLS = {}  # (process id, thread count) -> the ThreadPoolExecutor that draws CPU chunks


def _chunk_seed(gen):
    """The seed of a large tensor's first chunk, drawn from the pass's generator."""
    return int(torch.randint(0, 2**62, (1,), generator=gen))


def _random_words(n, gen):
    """The ceil(n/64) random 64-bit words that Rademacher z of n entries takes from `gen` (see _DIRECTIONS)."""
    return torch.empty(-(-n // 64), dtype=torch.int64, device=gen.device).random_(-2**63, None, generator=gen)


def _signs_from_words_(out, words, n, table, index):
    """out[:n] <- the first n signs that `words` stand for (_DIRECTIONS), the 8 signs of each byte looked up in
    `table` (_sign_table); out has room for n rounded up to 8 entries, `index` (int32 scratch) for ceil(n/8).
    Returns out[:n]."""
    nbytes = -(-n // 8)
    part = words.view(torch.uint8)[:nbytes]
    torch.index_select(table, 0, index[:nbytes].copy_(part), out=out[: 8 * nbytes].view(nbytes, 8))
    return out[:n]


def _chunks_on_threads(work, threads):
    """For each (x, source, apply) of `work`, x a 1-D chunk of at most _CPU_CHUNK entries: z shaped like x,
    then apply(x, z); apply None: x itself <- z. Source is a seed (Gaussian z from a generator seeded with it)
    or the chunk's random words (Rademacher z, _DIRECTIONS). Contiguous runs of `work` go to `threads`
    threads."""
    def run(part, own_thread=True):
        if own_thread:
            torch.set_num_threads(1)  # a pool thread: every op of its chunks on this core alone
        gen, scratch, tables = torch.Generator(), {}, {}
        with torch.no_grad():
            for x, source, apply in part:
                if apply is None:
                    x.normal_(generator=gen.manual_seed(source))
                    continue
                if x.dtype not in scratch:
                    scratch[x.dtype] = torch.empty(_CPU_CHUNK, dtype=x.dtype)
                z = scratch[x.dtype]
                if isinstance(source, int):
                    z = z[: x.numel()].normal_(generator=gen.manual_seed(source))
                else:
                    if x.dtype not in tables:
                        tables[x.dtype] = _sign_table(x.device, x.dtype)
                    if "index" not in scratch:
                        scratch["index"] = torch.empty(_CPU_CHUNK // 8, dtype=torch.int32)
                    z = _signs_from_words_(z, source, x.numel(), tables[x.dtype], scratch["index"])
                apply(x, z)

    used, caller = min(threads, len(work)), torch.get_num_threads()
    if used <= 1:
        return run(work, own_thread=False)
    key = (os.getpid(), used)  # a forked child has none of its parent's threads: it makes its own pool
    pool = _POOLS.get(key) or _POOLS.setdefault(key, ThreadPoolExecutor(used, "dizo-z"))
    bounds = [len(work) * i // used for i in range(used + 1)]
    futures = [pool.submit(run, work[a:b]) for a, b in zip(bounds, bounds[1:])]
    try:
        for future in futures:
            future.result()
    finally:
        wait(futures)  # never leave a thread changing θ behind an error
        # torch.set_num_threads(1) in a pool thread also sets the count that threads not yet using torch
        # start with: put back the caller's
        torch.set_num_threads(caller)


def _normal_on_cpu_(z, gen, threads):
    """z (flat, on a CPU) <- N(0, I) from the pass's generator `gen` as described above, on `threads`."""
    if z.numel() <= _CPU_CHUNK:
        return z.normal_(generator=gen)
    seed = _chunk_seed(gen)
    _chunks_on_threads([(x, seed + k, None) for k, x in enumerate(z.split(_CPU_CHUNK))], threads)
    return z


def _sign_table(device, dtype):
    """Row b holds the 8 signs that byte b stands for: +1 where bit j of b is 0, -1 where it is 1."""
    bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
    return (1 - 2 * bits).to(device, dtype)


def _z_streams(devices):
    """For each device holding trained tensors (in order of first appearance), where its z is drawn: one
    stream per device type, on the first device of that type, seeded with the step's seed + the type's
    index. A model split across devices of one type then sees the z of the unsplit model on the first of
    them; a model on one device draws from seed + 0; devices of different types (CPU and a GPU) draw
    independent streams."""
    first = {}
    for device in devices:
        first.setdefault(device.type, (device, len(first)))
    return {device: first[device.type] for device in devices}


def _anchor_device(device: str | torch.device) -> torch.device:
    """anchor_device as a torch.device, or a ValueError that says what is accepted."""
    try:
        device = torch.device(device)
        torch.empty(0, device=device)  # the device exists and this torch build can allocate on it
    except (RuntimeError, TypeError, AssertionError) as e:
        raise ValueError(f"anchor_device must be None or a device this machine has, e.g. \"cpu\"; got "
                         f"{device!r} ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return device


def _copy_on(t, device):
    """A copy of t on `device`, in pinned memory when it goes from a GPU to the host (faster copies back)."""
    pinned = device.type == "cpu" and t.is_cuda
    return torch.empty(t.shape, dtype=t.dtype, device=device, pin_memory=pinned).copy_(t)


def _view_like(t, base, other):
    """The view of `other` (laid out like `base`) that `t` is of `base`."""
    offset = other.storage_offset() + t.storage_offset() - base.storage_offset()
    return other.as_strided(t.shape, t.stride(), offset)


class ZOSGD(torch.optim.Optimizer):
    """ZO-SGD with MeZO's seed replay: two forward passes per step, no gradient, no optimizer state.

    step(closure) evaluates the closure exactly twice (2q times with q queries), at θ + εz and θ - εz, and
    returns the first loss (as MeZO does). z is never stored: one 62-bit seed is drawn per step (per query)
    from the optimizer's own generator, torch.Generator(seed), and every pass over the parameters regenerates
    z tensor by tensor, in the order of the parameter groups, from that seed (+ i for the i-th device type;
    see _z_streams), from one generator seeded with it. On a CPU a tensor of more than 2^16 entries stepped in
    place is drawn and stepped in chunks on every thread: Gaussian z from seeds that generator draws (another
    stream), Rademacher z from the words it draws (the same stream; see _normal_on_cpu_); one scratch buffer
    per (device, dtype), the size of the largest other tensor, holds the current tensor's z.

    MeZO regenerates z four times per step (+ε, -2ε, +ε to restore, then -ηg to update). Here the restore
    and the update are fused into one pass, θ <- θ + (ε - ηg) z, so z is generated three times.

    Arguments (defaults as MeZO's and DiZO's code):
        lr              η; ~1e-6 for billion-parameter LMs (the released value for OPT), far larger for small
                        models: sweep a few decades and keep the largest that lowers the training loss.
                        Per group, and read at every step (learning-rate schedulers work).
        eps             ε of eq. (1) (released: 1e-3). One for all groups: g is one scalar for the whole model.
        weight_decay    λ, MeZO's (DiZO's code has none: default 0), on matrices only, i.e. tensors with two
                        or more dimensions: biases and LayerNorm weights are vectors. Decided by shape.
        seed            seeds the optimizer's generator; the global torch RNG is never re-seeded (only
                        replayed, so that both forward passes draw the same dropout masks).
        half_precision  for bf16 and fp16 parameters: "exact" (default) keeps their fp32 value (see _HALF
                        above: 2 more bytes per bf16 parameter, 4 per fp16 one) and steps it exactly as an
                        fp32 parameter, with z drawn in fp32; "plain" steps them in place, z drawn in their
                        dtype, as MeZO's and DiZO's code do in fp16 (it warns, with the numbers). A
                        checkpoint (state_dict) holds the fp32 values, so a resumed run continues bit for bit.
        direction       "gaussian" (default; MeZO's and DiZO's z ~ N(0, I)) or "rademacher" (z_i = ±1, the
                        original SPSA; a different z stream, faster to draw: see _DIRECTIONS above).
        queries         q of eq. (1): directions per step, each with its own seed, all evaluated at the same
                        θ and averaged in the update, θ <- θ - (η/q) Σ_j g_j z_j (default 1, as MeZO and
                        DiZO). 2q forward passes and 4q - 1 passes over θ per step, at q = 1's memory.
    """

    _SHARED = ("eps", "half_precision", "direction", "queries")  # settings every group must share

    def __init__(self, params: Params, lr: float, eps: float = 1e-3, weight_decay: float = 0.0,
                 seed: int = 0, *, half_precision: str = "exact", direction: str = "gaussian",
                 queries: int = 1) -> None:
        self._start(params, dict(lr=lr, eps=eps, weight_decay=weight_decay, half_precision=half_precision,
                                 direction=direction, queries=queries), seed)

    def _start(self, params, defaults, seed):
        _check("seed", seed, isinstance(seed, int) and seed >= 0, "an int >= 0")
        self._constructed = False
        super().__init__(params, defaults)  # add_param_group checks every group's settings
        self._warn_if_plain_half(self.param_groups)
        self._constructed = True
        self.steps_done = 0
        self.projected_grad = None  # g of the last step (the mean over its queries), for logging
        self.projected_grads = []  # g_1 .. g_q of the last step
        self._seeds = torch.Generator().manual_seed(seed)  # draws one seed per step
        self._z_gens = {}  # device -> torch.Generator, re-seeded at every pass
        self._buffers = {}  # (device, dtype) -> flat scratch tensor for z
        self._scratch = {}  # (use, device) -> scratch tensor: a block of a bf16 master, random words, indices
        self._sign_tables = {}  # (device, dtype) -> _sign_table

    def _check_settings(self, s):
        _check("lr", s["lr"], 0 <= s["lr"] < math.inf, "finite and >= 0")
        _check("eps", s["eps"], 0 < s["eps"] < math.inf, "finite and > 0")
        _check("weight_decay", s["weight_decay"], 0 <= s["weight_decay"] < math.inf, "finite and >= 0")
        _check("half_precision", s["half_precision"], s["half_precision"] in ("exact", "plain"),
               '"exact" or "plain"')
        _check("direction", s["direction"], s["direction"] in _DIRECTIONS, '"gaussian" or "rademacher"')
        _check("queries", s["queries"], isinstance(s["queries"], int) and s["queries"] >= 1, "an int >= 1")

    def _shared_settings(self, groups=None):
        """The settings all groups share (g is one scalar for the whole model, so there is one ε)."""
        groups = self.param_groups if groups is None else groups
        for key in self._SHARED:
            values = [g[key] for g in groups]
            if any(v != values[0] for v in values):
                raise ValueError(f"{key} differs between parameter groups ({values}); it must be the same "
                                 f"in all of them: one ZO step estimates one scalar g for the whole model")
        return {key: groups[0][key] for key in self._SHARED}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch.optim's add_param_group, with the group's settings checked; works after the first step."""
        settings = {**self.defaults, **param_group}
        self._check_settings(settings)
        self._shared_settings(self.param_groups + [settings])
        super().add_param_group(param_group)
        if self._constructed:
            self._warn_if_plain_half(self.param_groups[-1:])

    def _warn_if_plain_half(self, groups):
        """Warn, with the numbers, that plain half precision rounds away updates below its resolution."""
        halves = [p for g in groups for p in g["params"] if p.dtype in _HALF and p.requires_grad]
        lr = max(g["lr"] for g in groups)
        if groups[0]["half_precision"] != "plain" or not halves or lr == 0:
            return
        dtype, n = halves[0].dtype, sum(p.numel() for p in halves)
        # a change below half the spacing of the values near θ, |θ|·eps/4 to |θ|·eps/2, rounds away
        eps = torch.finfo(dtype).eps
        with torch.no_grad():
            typical = float(sum(p.abs().sum(dtype=torch.float32) for p in halves)) / n
        warnings.warn(f"half_precision='plain': {n:,} {dtype} parameters are stepped in place; {dtype} rounds "
                      f"away a change smaller than half its spacing, |θ|·{eps / 4:.2g} to |θ|·{eps / 2:.2g}, so "
                      f"with lr = {lr:g} a weight of the mean size here (|θ| = {typical:.3g}) moves only "
                      f"where |g·z| > {typical * eps / 4 / lr:.3g} or more, and every ±εz pass rounds (θ drifts "
                      f"even at lr 0). half_precision='exact' (the default) steps an fp32 value instead.",
                      stacklevel=4)

    def _params(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    yield group, p

    def _devices(self):
        return list(dict.fromkeys(p.device for _, p in self._params()))  # in order of first appearance

    def _keeps_master(self, p):
        """True if p is stepped through an fp32 master: a half-precision tensor under half_precision="exact"."""
        return p.dtype in _HALF and self.param_groups[0]["half_precision"] == "exact"

    def _value_dtype(self, p):
        """The dtype in which p's value is stepped, and z drawn: fp32 for a master, else p's own."""
        return torch.float32 if self._keeps_master(p) else p.dtype

    def _companion(self, t):
        """The part of t's fp32 master that t does not hold, as a tensor laid out like t (a view if t is a view
        of a parameter): int16 low bits for bf16, the whole fp32 value for fp16. Created at first use from t
        itself, so the master starts as the weights are."""
        base = t if t._base is None else t._base
        state = self.state[base]
        key = "low_bits" if base.dtype == torch.bfloat16 else "master"
        if key not in state:
            if key == "low_bits":
                state[key] = torch.zeros_like(base, dtype=torch.int16)
            else:
                state[key] = torch.empty_like(base, dtype=torch.float32).copy_(base)
        return _view_like(t, base, state[key])

    def _scratch_for(self, use, device, dtype, n):
        """n elements of reused scratch memory, one tensor per (use, device), grown as needed."""
        buf = self._scratch.get((use, device))
        if buf is None or buf.numel() < n:
            buf = self._scratch[(use, device)] = torch.empty(n, device=device, dtype=dtype)
        return buf[:n]

    def _values(self, t, *others, write=True):
        """Blocks (x, *o) that cover tensor t: x holds the exact value of a block of t, in the dtype of
        _value_dtype(t), and each o the same block of one of `others` (tensors shaped like t). The caller
        may change x in place; with write=True it is stored back before the next block is given: into t
        itself, or for a master, into the master and t (rounded to nearest). A bf16 master is rebuilt from t
        and its low bits block by block, in scratch memory of _block(device) elements."""
        if not self._keeps_master(t):
            yield (t, *others)
            return
        if t.dtype == torch.float16:
            master = self._companion(t)
            yield (master, *others)
            if write:
                t.copy_(master)
            return
        for hi, low, *rest in _row_blocks(t, self._companion(t), *others):
            bits = self._bits(hi)
            yield (_join_bf16(hi, low, bits), *rest)
            if write:
                _split_bf16_(bits, hi, low)

    def _bits(self, block):
        """int32 scratch shaped like `block`, in which the block's fp32 master is built."""
        return self._scratch_for("master", block.device, torch.int32, block.numel()).view(block.shape)

    def exact_value(self, p: torch.Tensor) -> torch.Tensor:
        """The value the optimizer steps for trained tensor p: for a bf16 or fp16 p under half_precision=
        "exact" a new fp32 tensor (p is this rounded to nearest), else p itself (detached)."""
        if not self._keeps_master(p):
            return p.detach()
        out = torch.empty(p.shape, device=p.device, dtype=torch.float32)
        with torch.no_grad():
            for x, o in self._values(p, out, write=False):
                o.copy_(x)
        return out

    def _z_buffer(self, device, dtype, n, sources):
        """The scratch buffer for z of `dtype` on `device`, at least n long: as large as the largest tensor
        drawn on it or living on it (sources: device -> the device its z is drawn on), leaving out those
        whose z is applied chunk by chunk (_on_threads)."""
        buf = self._buffers.get((device, dtype))
        if buf is None or buf.numel() < n:  # the first pass, a group added or a tensor unfrozen: grow it
            largest = max([n] + [q.numel() for _, q in self._params() if self._value_dtype(q) == dtype
                                 and device in (q.device, sources[q.device]) and not self._on_threads(q, sources)])
            # rounded up to whole bytes of signs: Rademacher z is written 8 entries at a time
            buf = self._buffers[(device, dtype)] = torch.empty(-(-largest // 8) * 8, device=device, dtype=dtype)
        return buf

    def _on_threads(self, p, sources):
        """True if a pass applies p's z chunk by chunk on the drawing threads (see _normal_on_cpu_): z drawn on
        p's own CPU, p larger than a chunk, contiguous, and stepped in place (no master)."""
        return (p.device.type == "cpu" and sources[p.device] == p.device and p.numel() > _CPU_CHUNK
                and not self._keeps_master(p) and p.is_contiguous())

    def _chunk_sources(self, p, gen):
        """For a tensor applied on the drawing threads, what each chunk's z comes from, taken from the pass's
        generator in z's place: Gaussian z, a seed s and chunk k from s + k (another stream than gen's);
        Rademacher z, the tensor's random words, _CPU_CHUNK/64 per chunk (the same words as drawn whole)."""
        if self.param_groups[0]["direction"] == "gaussian":
            first = _chunk_seed(gen)
            return [first + k for k in range(-(-p.numel() // _CPU_CHUNK))]
        return list(_random_words(p.numel(), gen).split(_CPU_CHUNK // 64))

    def _z(self, p, sources, threads):
        """The next z for tensor p, drawn from the generator of p's device type (on sources[p.device]) in a
        reused scratch buffer, and copied to p's device if that is another."""
        dtype, source = self._value_dtype(p), sources[p.device]
        buf, gen = self._z_buffer(source, dtype, p.numel(), sources), self._z_gens[source]
        z = buf[: p.numel()]
        if self.param_groups[0]["direction"] == "rademacher":
            z = self._signs_(buf, p.numel(), gen)
        elif source.type == "cpu":
            _normal_on_cpu_(z, gen, threads)
        else:
            z.normal_(generator=gen)
        if source != p.device:
            z = self._z_buffer(p.device, dtype, p.numel(), sources)[: p.numel()].copy_(z)
        return z.view(p.shape)

    def _signs_(self, buf, n, gen):
        """buf[:n] <- Rademacher z from ceil(n/64) random 64-bit words of gen (see _DIRECTIONS); returns it."""
        words = self._scratch_for("words", buf.device, torch.int64, -(-n // 64))
        words.random_(-2**63, None, generator=gen)  # the full 64-bit range: every bit random, as _random_words
        key = (buf.device, buf.dtype)
        if key not in self._sign_tables:
            self._sign_tables[key] = _sign_table(*key)
        index = self._scratch_for("index", buf.device, torch.int32, min(-(-n // 8), _SIGN_BLOCK))
        for start in range(0, n, 8 * _SIGN_BLOCK):  # _SIGN_BLOCK bytes of words at a time
            _signs_from_words_(buf[start:], words[start // 64:], min(8 * _SIGN_BLOCK, n - start),
                               self._sign_tables[key], index)
        return buf[:n]

    def _zs(self, seed, deferred=False):
        """(group, p, z) for every trainable tensor, z regenerated from the step's seed (MeZO's seed replay).
        deferred=True: for a tensor whose z is applied on the drawing threads (_on_threads), z is instead
        the list of its chunks' sources (_chunk_sources)."""
        streams = _z_streams(self._devices())
        for source, offset in dict.fromkeys(streams.values()):
            if source not in self._z_gens:
                self._z_gens[source] = torch.Generator(device=source)
            self._z_gens[source].manual_seed(seed + offset)
        sources = {device: source for device, (source, _) in streams.items()}
        threads = torch.get_num_threads()
        gaussian = self.param_groups[0]["direction"] == "gaussian"
        try:
            if "cpu" in (s.type for s in sources.values()) and (
                    gaussian or any(self._on_threads(p, sources) for _, p in self._params())):
                torch.set_num_threads(1)  # see _normal_on_cpu_: the caller's θ += αz on this thread alone
            for group, p in self._params():
                if deferred and self._on_threads(p, sources):
                    yield group, p, self._chunk_sources(p, self._z_gens[sources[p.device]])
                else:
                    yield group, p, self._z(p, sources, threads)
        finally:
            torch.set_num_threads(threads)

    def _pass_(self, seed, apply):
        """One pass over θ: apply(group, p, x, z) for the value x of every trained tensor p (or each block of
        it; see _values) and its z from `seed`. A tensor whose z is drawn in chunks on threads is applied
        there, chunk by chunk: Gaussian ones after the others, all in one share-out (a chunk's seed costs
        nothing to keep), Rademacher ones at once (a tensor's words take an eighth of a byte per entry)."""
        threads, work = torch.get_num_threads(), []
        for group, p, z in self._zs(seed, deferred=True):
            if isinstance(z, list):
                chunks = p.detach().view(-1).split(_CPU_CHUNK)
                work += [(x, source, functools.partial(apply, group, p)) for x, source in zip(chunks, z)]
                if not isinstance(z[0], int):  # Rademacher: applied now, so one tensor's words are alive at a time
                    _chunks_on_threads(work, threads)
                    work = []
            else:
                for x, zb in self._values(p, z):
                    apply(group, p, x, zb)
        _chunks_on_threads(work, threads)

    @torch.no_grad()
    def _perturb_(self, seed, alpha):
        """θ <- θ + alpha z."""
        self._pass_(seed, lambda group, p, x, z: x.add_(z, alpha=alpha))

    @torch.no_grad()
    def _update_(self, seeds, eps, grads):
        """From θ - εz_q: θ <- θ - (η/q) Σ_j g_j z_j, eq. (2) averaged over the q queries. The last query's
        restore and update are one pass, θ <- θ + (ε - ηg_q/q) z_q; MeZO's decay θ <- (1 - ηλ) θ applies to
        the restored θ, between adding εz_q and subtracting; then one pass per other query."""
        q = len(grads)

        def restore_and_update(group, p, x, z):
            alpha = eps - group["lr"] * grads[-1] / q
            decay = 1.0 - group["lr"] * group["weight_decay"] if p.dim() >= 2 else 1.0
            if decay != 1.0:
                x.add_(z, alpha=eps).mul_(decay).add_(z, alpha=alpha - eps)
            else:
                x.add_(z, alpha=alpha)

        self._pass_(seeds[-1], restore_and_update)
        for seed, grad in zip(seeds[:-1], grads[:-1]):
            self._pass_(seed, lambda group, p, x, z, grad=grad: x.add_(z, alpha=-group["lr"] * grad / q))

    def _next_seed(self):
        return int(torch.randint(0, 2**62, (1,), generator=self._seeds))

    @torch.no_grad()
    def _zo_step(self, closure):
        """One ZO-SGD step, eq. (1) and (2) with q queries: g_j from ℓ± at θ ± εz_j for j = 1..q, all at
        the same θ, then θ <- θ - (η/q) Σ_j g_j z_j. q = 1: ℓ+, ℓ-, then θ <- θ + (ε - ηg) z."""
        _require_closure(closure)
        settings = self._shared_settings()
        eps = settings["eps"]
        seeds = [self._next_seed() for _ in range(settings["queries"])]
        grads, losses = [], []
        for j, seed in enumerate(seeds):
            if j > 0:
                self._perturb_(seeds[j - 1], eps)  # θ - εz_{j-1} back to θ
            grad, loss_plus = self._query(closure, seed, eps)
            grads.append(grad)
            losses.append(loss_plus)
        self._update_(seeds, eps, grads)                                    # eq. (2)
        self.steps_done += 1
        self.projected_grads = grads
        self.projected_grad = sum(grads) / len(grads)
        return losses[0]

    def _query(self, closure, seed, eps):
        """From θ: ℓ+ at θ + εz and ℓ- at θ - εz, z from `seed`; returns g (eq. (1)) and ℓ+, θ left at θ - εz."""
        rng = _GlobalRNG(self._devices())
        loss_plus = self._loss_at(closure, seed, eps, moved_from=0.0)       # ℓ+ = L(θ + εz)
        rng.replay()  # the same dropout masks in both passes
        loss_minus = self._loss_at(closure, seed, -eps, moved_from=eps)     # ℓ- = L(θ - εz)
        grad = (float(loss_plus) - float(loss_minus)) / (2 * eps)           # g, eq. (1)
        if not math.isfinite(grad):
            error = FloatingPointError(f"non-finite loss at ZO step {self.steps_done + 1}: L(θ+εz)="
                                       f"{float(loss_plus)}, L(θ-εz)={float(loss_minus)}")
            self._put_back_(error, seed, -eps)
            raise error
        return grad, loss_plus

    def _loss_at(self, closure, seed, offset, moved_from):
        """Move θ from θ + moved_from·z to θ + offset·z and return the closure's loss there; if the closure
        fails or returns anything but one scalar, θ is put back first."""
        self._perturb_(seed, offset - moved_from)
        try:
            loss = closure()
            _scalar(loss, f"θ {'+' if offset > 0 else '-'} εz")
        except BaseException as error:
            self._put_back_(error, seed, offset)
            raise
        return loss

    @torch.no_grad()
    def _put_back_(self, error, seed, offset):
        """Undo θ + offset·z (offset = ±ε) by replaying z, the perturbations undone in reverse order, and
        say on the error how close θ is to its value before the step (θ's fp32 master, where it has one).

        Replay cannot restore θ bit for bit (that would need a copy of the model), but it can bound the
        rounding: each add_ rounds at most twice (αz, then the sum), by at most half a unit in the last
        place of a value no larger than |θ| + 2ε|z|, so the up to four add_ of a step and its undo stay
        below finfo.eps · (3|θ| + 8ε|z|) per element. That bound, maximised, is what the note reports.
        """
        bound, largest, eps = 0.0, 0.0, abs(offset)
        for _, p, z in self._zs(seed):
            for x, zb in self._values(p, z):
                if offset < 0:
                    x.add_(zb, alpha=2 * eps)
                x.add_(zb, alpha=-eps)
                err = float(torch.finfo(x.dtype).eps * (3 * x.abs() + 8 * eps * zb.abs()).max())
                bound = max(bound, err) if math.isfinite(err) else math.inf  # inf: θ ± εz overflowed
                largest = max(largest, float(x.abs().max()))
        what = (f"ZO step {self.steps_done + 1} stopped with θ at θ {'+' if offset > 0 else '-'} εz"
                + (" (the closure runs under torch.no_grad(): return the loss, do not call backward())"
                   if "does not require grad" in str(error) else ""))
        if bound >= largest:  # the rounding of θ ± εz may have wiped θ out
            _note(error, f"{what}; θ could NOT be restored (eps = {eps:g} is too large for the weights' "
                         f"precision): reload the weights")
        else:
            _note(error, f"{what}; θ was restored by replaying z, each element within {bound:.3g} of its "
                         f"value before the step")

    def step(self, closure: Closure | None = None) -> Loss:
        """One ZO-SGD step (eq. (1) and (2)); returns the closure's value at θ + εz."""
        return self._zo_step(closure)

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state (the param groups and their settings, the fp32 masters of half-precision
        tensors) plus what continues the run bit for bit: the step count and the seed generator's state."""
        state = super().state_dict()
        state["zo"] = {"steps_done": self.steps_done, "seeds": self._seeds.get_state()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state from ZOSGD.state_dict(): the next z is the one the saved run would have drawn."""
        if "zo" not in state_dict:
            raise ValueError(f"not a state_dict of ZOSGD or DiZO (it has no 'zo' entry): it comes from "
                             f"another optimizer and cannot continue this {type(self).__name__}")
        if "dizo" in state_dict:
            raise ValueError("this state_dict is DiZO's (it holds anchors and ratios): load it into a DiZO")
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo")
        super().load_state_dict(state_dict)
        self._restore_masters(state_dict["state"])
        self.steps_done = zo["steps_done"]
        self._seeds.set_state(zo["seeds"])

    def _restore_masters(self, saved):
        """torch.optim's load_state_dict casts every floating-point state tensor to its parameter's dtype,
        which would round an fp32 master to fp16 and read int16 low bits as bf16 numbers: put back the
        saved ones as saved."""
        params = [p for group in self.param_groups for p in group["params"]]  # torch's numbering
        for index, entries in saved.items():
            for key in ("low_bits", "master"):
                if key in entries:
                    self.state[params[index]][key] = entries[key].to(params[index].device, copy=True)


_END = object()  # end of an iterator


class DiZO(ZOSGD):
    """ZO-SGD plus DiZO's divergence-driven projection of selected weight matrices (§3).

    Every `interval` (κ) ZO steps, a projection phase rescales each projected matrix's distance from its
    anchor θ0 (its value when the optimizer is constructed, e.g. the pretrained weights; only the projected
    matrices are copied):

        θ_l <- θ0_l + r_l Δ_l,   Δ_l = θ_l - θ0_l,   r_l = γ_l / ||Δ_l||   (a target distance γ_l per matrix)

    The ratios are searched by SPSA on the scalars, with `proj_iters` (M) iterations, each on a fresh
    mini-batch, starting from the identity r = 1 (γ = ||Δ||, §3's re-initialisation). Per iteration:
        u_l ~ N(0, 1), clipped to ±(τ/ε_γ)·s_l    (so that a trial never moves γ_l by more than τ·s_l)
        ℓ± = L(θ0 + (r ± ε_γ u / s) Δ)              (two forward passes on the iteration's batch)
        ĝ = (ℓ+ - ℓ-) / (2 ε_γ)
        r_l <- clip(r_l - η_γ ĝ u_l, 1 - τ, 1 + τ)   (γ <- γ - η_γ s ĝ u in trainer.py, divided by s)
    and the final r is applied. Trial projections are undone exactly by copying back the matrices saved at
    the start of the phase (the released code divides, which drifts in fp16). A trial writes the matrices
    only, never their fp32 masters, so the saved copy holds the matrices as stored (the anchor's size) and
    the masters keep the rest. It lives in the idle z scratch buffer as far as it fits (on a GPU the buffer
    is the size of the largest tensor, e.g. the embedding; an fp32 buffer holds a bf16 copy twice its
    length), in host memory beyond that: DiZO's extra device memory is the anchor, or with
    anchor_device="cpu" about the largest projected matrix (the projection streams one matrix at a time).

    Arguments beyond ZOSGD's (defaults are Skilteee/DiZO's large_models/trainer.py and its README):
        projected     the matrices to project: a list of tensors or of (name, tensor) pairs, as returned by
                      projected_params(model); each an optimized parameter requiring grad, or a view of one.
        interval      κ, ZO steps between projection phases (released: 50; searched 50/100/200/400).
        proj_iters    M, SPSA iterations per phase (released: 10, hard-coded there).
        proj_eps      ε_γ, perturbation scale of γ (released: 0.1; searched 0.1/0.05).
        proj_lr       η_γ, step size of the ratio search (released: 2.0; searched 2.0/1.0).
        tau           τ, the ratio is clipped to [1 - τ, 1 + τ] (released: 0.2; searched 0.1/0.2/0.3).
        search_data   where the γ search draws its batches, one per inner iteration: an iterable of batches
                      (iterated again when exhausted, so a DataLoader reshuffles) or a callable returning a
                      batch. Its position is not part of state_dict().
        search_loss   search_loss(batch) -> scalar loss; evaluated twice per batch (ℓ+ and ℓ-).
        anchor_device where θ0 is kept: None (default), beside each matrix; "cpu", in host memory (pinned
                      for a GPU), so that the accelerator holds only ZO's memory and one matrix at a time
                      during a phase, at the cost of copying the anchors (and the part of the saved copy
                      that overflows the z buffer) to the device at each trial.
      Without search_data and search_loss, the γ search evaluates the step's own closure, i.e. its M
      iterations see the step's batch only; the released code draws fresh batches.
    The settings above are in `defaults` and must be the same in every parameter group.
    """

    _SHARED = ZOSGD._SHARED + ("interval", "proj_iters", "proj_eps", "proj_lr", "tau")

    def __init__(self, params: Params, projected: Projected, lr: float, eps: float = 1e-3,
                 weight_decay: float = 0.0, seed: int = 0, *, half_precision: str = "exact",
                 direction: str = "gaussian", queries: int = 1, interval: int = 50, proj_iters: int = 10,
                 proj_eps: float = 0.1, proj_lr: float = 2.0, tau: float = 0.2,
                 search_data: Iterable[Any] | Callable[[], Any] | None = None,
                 search_loss: Callable[[Any], Loss] | None = None,
                 anchor_device: str | torch.device | None = None) -> None:
        self._start(params, dict(lr=lr, eps=eps, weight_decay=weight_decay, half_precision=half_precision,
                                 direction=direction, queries=queries, interval=interval,
                                 proj_iters=proj_iters, proj_eps=proj_eps, proj_lr=proj_lr, tau=tau), seed)
        self._check_search_source(search_data, search_loss)
        pairs = self._checked_projection(projected)
        self.names = [n for n, _ in pairs]
        self.matrices = [t for _, t in pairs]
        # θ0 = the matrices as they are now: a master created later starts from them (low bits 0)
        home = None if anchor_device is None else _anchor_device(anchor_device)
        self.anchors = [_copy_on(t.detach(), t.device if home is None else home) for t in self.matrices]
        self.ratios = torch.ones(len(pairs), dtype=torch.float64)  # last phase's r, for logging
        self.last_phase = None  # telemetry of the last phase: step, r_l, s_l, loss before and after
        self.gammas = torch.zeros(len(pairs), dtype=torch.float64)  # last phase's γ = r·s
        self._u_gen = torch.Generator().manual_seed(seed + 1)  # own stream: ZO seeds match ZOSGD's
        self._search_data, self._search_loss = search_data, search_loss
        self._search_iter = iter(())  # the first draw starts a pass over search_data

    def _check_settings(self, s):
        super()._check_settings(s)
        _check("interval", s["interval"], isinstance(s["interval"], int) and s["interval"] >= 1, "an int >= 1")
        _check("proj_iters", s["proj_iters"], isinstance(s["proj_iters"], int) and s["proj_iters"] >= 1,
               "an int >= 1")
        _check("proj_eps", s["proj_eps"], 0 < s["proj_eps"] < math.inf, "finite and > 0")
        _check("proj_lr", s["proj_lr"], 0 <= s["proj_lr"] < math.inf, "finite and >= 0")
        _check("tau", s["tau"], 0 < s["tau"] < 1, "in (0, 1)")

    def _checked_projection(self, projected):
        """(name, tensor) pairs from `projected`, each an optimized parameter requiring grad or a view of one."""
        if not isinstance(projected, (list, tuple)):
            raise TypeError(f"projected must be a list of tensors or (name, tensor) pairs, e.g. "
                            f"projected_params(model); got {type(projected).__name__}")
        if not projected:
            raise ValueError("projected is empty: DiZO would silently be ZO-SGD")
        optimized = {id(p) for group in self.param_groups for p in group["params"]}
        pairs = []
        for i, item in enumerate(projected):
            name, t = item if isinstance(item, tuple) and len(item) == 2 else (f"projected[{i}]", item)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"projected[{i}] ({name}) is a {type(t).__name__}, not a tensor")
            if not t.requires_grad:
                raise ValueError(f"projected matrix {name} does not require grad: it is frozen, ZO never "
                                 f"moves it, so there is nothing to project")
            if id(t if t._base is None else t._base) not in optimized:
                raise ValueError(f"projected matrix {name} is not one of the optimized parameters (nor a "
                                 f"view of one)")
            pairs.append((name, t))
        return pairs

    @staticmethod
    def _check_search_source(data, loss):
        if (data is None) != (loss is None):
            raise ValueError("search_data and search_loss go together: give both (the γ search draws one "
                             "batch of search_data per iteration and evaluates search_loss on it), or neither")
        if loss is not None and not callable(loss):
            raise TypeError(f"search_loss must be a function of one batch, got {type(loss).__name__}")
        if data is not None and not (callable(data) or isinstance(data, Iterable)):
            raise TypeError(f"search_data must be an iterable of batches or a function returning one, "
                            f"got {type(data).__name__}")

    @property
    def projection_due(self) -> bool:
        """True right after every κ-th ZO step."""
        return self.steps_done > 0 and self.steps_done % self._shared_settings()["interval"] == 0

    def step(self, closure: Closure | None = None) -> Loss:
        """One ZO step (2q closure calls); after every κ-th, a projection phase (2M + 2 more calls of the
        closure or of search_loss)."""
        loss = self._zo_step(closure)
        if self.projection_due:
            self.project(self._search_closure if self._search_loss is not None else lambda: closure)
        return loss

    def _search_batch(self):
        """The next batch of search_data: a call if it is callable, else the next item, starting a new
        pass over it when exhausted (a shuffling DataLoader reshuffles)."""
        if callable(self._search_data):
            return self._search_data()
        batch = next(self._search_iter, _END)
        if batch is _END:
            self._search_iter = iter(self._search_data)
            batch = next(self._search_iter, _END)
        if batch is _END:
            raise ValueError("search_data yields no batch: pass a non-empty list or DataLoader (iterable again "
                             "and again; a generator is not) or a function returning a batch")
        return batch

    def _search_closure(self):
        """The loss closure of one γ-search iteration: search_loss on a fresh batch of search_data."""
        batch = self._search_batch()
        return lambda: self._search_loss(batch)

    @torch.no_grad()
    def distances(self) -> torch.Tensor:
        """s_l = ||θ_l - θ0_l||_F for every projected matrix (float64, on the CPU), θ_l its exact value (the
        fp32 master of a half-precision matrix under half_precision="exact")."""
        dist = []
        for m, a in zip(self.matrices, self.anchors):
            a = a.to(m.device, non_blocking=True)  # one matrix at a time from where the anchors live
            # half precision is summed in fp32: a norm over millions of squares overflows fp16
            squares = [float(torch.linalg.vector_norm(x - ab, dtype=torch.promote_types(x.dtype, torch.float32)))
                       ** 2 for x, ab in self._values(m, a, write=False)]
            dist.append(math.sqrt(sum(squares)))
        return torch.tensor(dist, dtype=torch.float64)

    @torch.no_grad()
    def _set_ratios_(self, ratios, start, keep=False):
        """θ_l <- θ0_l + r_l (θ_start,l - θ0_l) for every projected matrix, one at a time; r_l = 1 gives
        θ_start,l back exactly. A trial writes the matrix only; keep=True also its master."""
        for m, a, s, r in zip(self.matrices, self.anchors, start, ratios.tolist()):
            self._project_(m, a.to(m.device, non_blocking=True), s.to(m.device, non_blocking=True), r, keep)

    def _project_(self, m, anchor, start, r, keep):
        """m <- θ0 + r (θ_start - θ0), computed in the dtype of m's value (fp32 for a master), from the anchor
        and the phase-start copy `start` (m as stored; a master holds the rest until keep=True)."""
        if not self._keeps_master(m):
            m.copy_(start)
            if r != 1.0:
                m.sub_(anchor).mul_(r).add_(anchor)  # works on views (GPT-2, NeoX)
            return
        for mb, ab, sb, cb in _row_blocks(m, anchor, start, self._companion(m)):
            bits = self._bits(mb)
            if m.dtype == torch.bfloat16:
                x = _join_bf16(sb, cb, bits)  # θ_start's master: its high half saved, its low bits kept
            else:
                x = bits.view(torch.float32).copy_(cb)  # the fp32 master, θ_start until kept
            if r != 1.0:
                x.sub_(ab).mul_(r).add_(ab)
            if m.dtype == torch.float16:
                if keep:
                    cb.copy_(x)
                mb.copy_(x)
            elif keep:
                _split_bf16_(bits, mb, cb)
            else:
                _round_bf16_(bits, mb)

    @torch.no_grad()
    def _saved_copies(self, tensors):
        """Copies of `tensors` as stored, placed in the idle z scratch buffer of their device (no new memory:
        the next ZO step overwrites it with fresh z) as far as they fit, in host memory beyond that."""
        used, copies = {}, []
        for t in tensors:
            key = (t.device, self._value_dtype(t))
            buf, size = self._buffers.get(key), t.numel() * t.element_size()
            start = -(-used.get(key, 0) // t.element_size()) * t.element_size()  # aligned for t's dtype
            if buf is not None and start + size <= buf.numel() * buf.element_size():
                copies.append(buf.view(torch.uint8)[start:start + size].view(t.dtype).view(t.shape).copy_(t))
                used[key] = start + size
            else:
                copies.append(_copy_on(t, torch.device("cpu")))
        return copies

    @torch.no_grad()
    def project(self, next_closure: Callable[[], Closure]) -> None:
        """One projection phase (§3): the γ search, then θ_l <- θ0_l + r_l Δ_l for good.

        next_closure() is called once per inner iteration and returns that iteration's loss closure (on a
        fresh mini-batch, as the released code draws one); that closure is evaluated twice, at r ± ε_γ u / s.
        The first iteration's closure is evaluated twice more, before the search and after the final r, and
        `last_phase` records both losses with the step, the ratios r_l and the distances s_l: 2M + 2 forward
        passes in all. step() calls this after every κ-th ZO step. If anything fails during the phase, the
        projected matrices are restored exactly to their values at its start before the error propagates.
        """
        start = self._saved_copies(self.matrices)  # for the exact undo of trial projections
        dist = self.distances()
        try:
            # The first iteration's batch also measures what the phase did: its loss before and after.
            first, rng = next_closure(), _GlobalRNG(self._devices())
            loss_before = _scalar(first(), "the loss before the projection phase")  # L(θ0 + Δ; B_1)
            pending = [first]
            ratios = self._search_ratios(lambda: pending.pop() if pending else next_closure(), start, dist)
            self._set_ratios_(ratios, start)  # θ_l <- θ0_l + r_l Δ_l
            rng.replay()
            loss_after = _scalar(first(), "the loss after the projection phase")  # L(θ0 + r Δ; B_1)
        except BaseException as error:
            self._set_ratios_(torch.ones_like(dist), start)
            _note(error, f"the projection phase after ZO step {self.steps_done} failed; the projected "
                         f"matrices were restored exactly (the step's ZO update stays applied)")
            raise
        self._set_ratios_(ratios, start, keep=True)  # the same matrices, now with their masters
        self.ratios, self.gammas = ratios, ratios * dist
        self.last_phase = {"step": self.steps_done, "ratios": ratios.tolist(), "distances": dist.tolist(),
                           "loss_before": loss_before, "loss_after": loss_after}

    def _search_ratios(self, next_closure, start, dist):
        """M iterations of clipped SPSA on the ratios r_l = γ_l / s_l, from r = 1 (γ = ||Δ||); returns r."""
        s = self._shared_settings()
        tau, eps_g = s["tau"], s["proj_eps"]
        ratios = torch.ones_like(dist)  # re-initialisation: γ = ||Δ||, the identity
        moving = dist > 0  # a matrix that has not moved has no direction to rescale
        for it in range(s["proj_iters"]):
            closure = next_closure()
            # u_l ~ N(0, 1), clipped to ±(τ/ε_γ) s_l; the trial γ_l ± ε_γ u_l is the ratio r_l ± δ_l,
            # δ_l = ε_γ u_l / s_l
            bound = (tau / eps_g) * dist
            u = torch.randn(len(dist), generator=self._u_gen, dtype=torch.float64).clamp(-bound, bound)
            trial = torch.where(moving, eps_g * u / dist.where(moving, 1.0), 0.0)
            rng = _GlobalRNG(self._devices())
            self._set_ratios_(ratios + trial, start)
            loss_plus = _scalar(closure(), "a trial projection of the γ search")   # ℓ+ = L(θ0 + (r + δ) Δ)
            rng.replay()  # the same dropout masks in both passes
            self._set_ratios_(ratios - trial, start)
            loss_minus = _scalar(closure(), "a trial projection of the γ search")  # ℓ- = L(θ0 + (r - δ) Δ)
            grad = (loss_plus - loss_minus) / (2 * eps_g)  # ĝ = (ℓ+ - ℓ-) / (2 ε_γ)
            if not math.isfinite(grad):
                raise FloatingPointError(f"non-finite loss in the projection phase after ZO step "
                                         f"{self.steps_done} (inner iteration {it + 1})")
            # r_l <- clip(r_l - η_γ ĝ u_l, 1 - τ, 1 + τ)
            ratios = (ratios - s["proj_lr"] * grad * u).clamp(1 - tau, 1 + tau)
        return ratios

    def state_dict(self) -> dict[str, Any]:
        """ZOSGD's state plus the anchors (so a resumed run needs no pretrained model), their names,
        the u generator and the last phase's ratios and γ."""
        state = super().state_dict()
        state["dizo"] = {"names": list(self.names), "anchors": [a.clone() for a in self.anchors],
                         "u_gen": self._u_gen.get_state(), "ratios": self.ratios.clone(),
                         "gammas": self.gammas.clone()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ZOSGD's state, the anchors (from the checkpoint, not from the current weights), the u
        generator and the last ratios; refuses a state that projects other matrices."""
        if "dizo" not in state_dict:
            source = "ZOSGD's (it has no anchors)" if "zo" in state_dict else "from another optimizer"
            raise ValueError(f"this state_dict is {source}: it cannot continue a DiZO")
        state_dict = dict(state_dict)
        dizo = state_dict.pop("dizo")
        if dizo["names"] != self.names:
            raise ValueError("checkpoint projects other matrices than this optimizer: "
                             f"{dizo['names'][:2]}... vs {self.names[:2]}...")
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for a, saved in zip(self.anchors, dizo["anchors"]):
                a.copy_(saved)
        self._u_gen.set_state(dizo["u_gen"])
        self.ratios, self.gammas = dizo["ratios"].clone(), dizo["gammas"].clone()


# Which matrices to project, found by module structure. Each rule recognises one family's attention block
# and returns (role, tensor) pairs, roles q, k, v, o; the tensor is a weight or a view of one. PEFT LoRA
# wrappers are seen through: a module with `base_layer` and ModuleDicts `lora_A`, `lora_B` keyed by adapter.

def _is_lora(module):
    return (hasattr(module, "base_layer") and isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict)
            and isinstance(getattr(module, "lora_B", None), torch.nn.ModuleDict))


def _unwrapped(module):
    return module.base_layer if _is_lora(module) else module


def _linear(module, name):
    """module.<name> if it is an nn.Linear (possibly inside a LoRA wrapper), else None."""
    m = _unwrapped(getattr(module, name, None))
    return m if isinstance(m, torch.nn.Linear) else None


def _separate_projections(module):
    """OPT, Llama, Mistral, Qwen2, ...: q_proj, k_proj, v_proj and out_proj (OPT) or o_proj (Llama)."""
    out = "out_proj" if hasattr(module, "out_proj") else "o_proj"
    linears = {role: _linear(module, n) for role, n in
               (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", out))}
    if not all(linears.values()):
        return None
    return [(role, m.weight) for role, m in linears.items()]


def _bert_attention(module):
    """BERT, RoBERTa: attention.self.{query,key,value} and attention.output.dense."""
    sa, out = getattr(module, "self", None), getattr(module, "output", None)
    linears = {"q": _linear(sa, "query"), "k": _linear(sa, "key"), "v": _linear(sa, "value"),
               "o": _linear(out, "dense")}
    if not all(linears.values()):
        return None
    return [(role, m.weight) for role, m in linears.items()]


def _gpt2_attention(module):
    """GPT-2: one fused c_attn (a Conv1D, weight [d, 3d] laid out q | k | v along columns) and c_proj.

    The fused weight is one parameter, but K and V are distinct matrices of the model, so DiZO projects
    each column block, a view of the parameter, on its own, like OPT's separate k_proj and v_proj.
    """
    c_attn, c_proj = _unwrapped(getattr(module, "c_attn", None)), _unwrapped(getattr(module, "c_proj", None))
    if c_attn is None or c_proj is None or getattr(c_attn, "weight", None) is None:
        return None
    w = c_attn.weight
    if w.dim() != 2 or w.shape[1] != 3 * w.shape[0]:
        return None  # cross-attention or another layout: not ours to guess
    d = w.shape[0]
    return [("q", w[:, :d]), ("k", w[:, d:2 * d]), ("v", w[:, 2 * d:]), ("o", c_proj.weight)]


def _neox_attention(module):
    """GPT-NeoX (Pythia): query_key_value, a Linear [3d, d] whose rows are per head [q | k | v].

    K and V are strided views of shape [heads, head_dim, d], one per role, as for GPT-2.
    """
    qkv, dense = _linear(module, "query_key_value"), _linear(module, "dense")
    head_size = getattr(module, "head_size", None)
    if qkv is None or dense is None or not head_size:
        return None
    w = qkv.weight.view(-1, 3, head_size, qkv.weight.shape[1])
    return [("q", w[:, 0]), ("k", w[:, 1]), ("v", w[:, 2]), ("o", dense.weight)]


_RULES = (_separate_projections, _bert_attention, _gpt2_attention, _neox_attention)
SUPPORTED_FAMILIES = "OPT, Llama/Mistral/Qwen2, BERT/RoBERTa, GPT-2, GPT-NeoX"


def _attention(module):
    """(role, tensor) pairs of `module` if some rule recognises it as an attention block, else None."""
    return next((hits for hits in (rule(module) for rule in _RULES) if hits), None)


def _lora_factors(layer):
    """(A, B) weights of the active adapters of a PEFT LoRA layer that are trained."""
    adapters = getattr(layer, "active_adapters", None) or list(layer.lora_A)
    return [t for a in adapters if a in layer.lora_A
            for t in (layer.lora_A[a].weight, layer.lora_B[a].weight) if t.requires_grad]


def projected_params(model: torch.nn.Module,
                     roles: Sequence[str] = ("k", "v")) -> list[tuple[str, torch.Tensor]]:
    """The trained attention matrices DiZO projects, as (name, tensor) pairs, in module order.

    Default roles K and V, as Skilteee/DiZO's large_models/trainer.py (OPT's k_proj and v_proj); any of
    "q", "k", "v", "o". Matrices are found by the structure of each family's attention block, never by a
    single name check, and a model in which none is found raises instead of silently projecting nothing.
    Names are those of model.named_parameters() (torch.compile's `_orig_mod.` removed, so a checkpoint of
    the eager model loads into the compiled one); a view is named after its parameter, plus [k] or [v].

    Only trained tensors are returned. A matrix wrapped by PEFT LoRA contributes the LoRA factors A and B of
    its active adapter instead of its frozen weight, so on a PeftModel the default is LoRA A and B of the
    K and V projections. The released code, under LoRA, projects every LoRA tensor of the model, and its
    LoRA sits on q_proj and v_proj (OPT): with PEFT's default targets (q_proj, v_proj for OPT and Llama)
    the default here projects V's factors only; roles=("q", "v") projects what the released code does.
    The anchors are the factors at DiZO's construction: right after get_peft_model, A is its random
    initialisation and B = 0, so Δ_B = B and rescaling ||Δ_B|| rescales the whole adapter update B A, while
    rescaling Δ_A = A - A_0 rescales how far A has moved from its initialisation.
    """
    bad = set(roles) - {"q", "k", "v", "o"}
    if not roles or bad:
        raise ValueError(f"roles must be a non-empty subset of q, k, v, o, got {roles!r}")
    names = {id(p): re.sub(r"(^|\.)_orig_mod\.", r"\1", n) for n, p in model.named_parameters()}
    lora = {id(m.base_layer.weight): m for m in model.modules()
            if _is_lora(m) and getattr(m.base_layer, "weight", None) is not None}
    blocks = [hits for hits in (_attention(module) for module in model.modules()) if hits]
    if not blocks:
        raise ValueError(f"no attention block recognised in {type(model).__name__}; "
                         f"projected_params supports {SUPPORTED_FAMILIES}")
    found = []
    for role, t in (hit for hits in blocks for hit in hits if hit[0] in roles):
        if id(t) in lora:  # the weight is frozen under LoRA: its trained factors instead
            found += [(names[id(f)], f) for f in _lora_factors(lora[id(t)])]
        elif t.requires_grad:
            found.append((names[id(t)] if t._base is None else f"{names[id(t._base)]}[{role}]", t))
    if not found:
        adapted = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_lora(m)})
        where = f"LoRA adapters sit on {', '.join(adapted)} only" if adapted else "those weights are frozen"
        raise ValueError(f"no trained attention matrix for roles {', '.join(roles)}: {where}; train those "
                         f"matrices or put LoRA adapters on them")
    return found


def projection_report(pairs: Sequence[tuple[str, torch.Tensor]]) -> dict[str, int]:
    """Count, parameters and anchor bytes of the projected matrices, for the user to check the choice."""
    tensors = [t for _, t in pairs]
    return {"matrices": len(tensors), "params": sum(t.numel() for t in tensors),
            "anchor_bytes": sum(t.numel() * t.element_size() for t in tensors)}


def divergence(model: torch.nn.Module, anchor: dict[str, torch.Tensor],
               roles: Sequence[str] = ("k", "v")) -> dict[str, list[float]]:
    """The layer-wise divergence of §2.2, ||W - W0||_F of each attention matrix, by role in layer order:
    {"k": [layer 0, layer 1, ...], ...}. `anchor` maps the names projected_params(model, roles) gives to the
    pretrained values (e.g. a clone taken before training)."""
    with torch.no_grad():
        # the difference in fp32: two nearby bf16 values subtracted in bf16 lose their low bits
        return {role: [float(torch.linalg.vector_norm(t.float() - anchor[n].float()))
                       for n, t in projected_params(model, roles=(role,))] for role in roles}
