"""Time and memory of one training step: inference, a MeZO-style reference step, ZOSGD, DiZO and FO (AdamW).

Every (shape, method) runs in a fresh process (forked on CPU, spawned on CUDA), so that one method's memory
cannot hide in another's peak. Models are randomly initialised from a config (no download); the loss is a
real one on a random batch: next-token cross-entropy for OPT, masked-LM cross-entropy (15% of positions)
for RoBERTa.

    python bench.py                                   # CPU fp32, tiny, opt-125m, roberta-base: ~7 min on 2 idle cores
    python bench.py --shapes tiny --repeats 5         # a quick check
    python bench.py --device cuda --dtype bf16 --shapes opt-1.3b
    python bench.py --precision                       # ZO under fp32 / bf16 plain, exact, autocast: ~30 s on 1 core

What is measured, per (shape, method):
  time    median seconds per step over --repeats timed steps, after --warmup untimed ones; on CUDA the device
          is synchronised before and after each step.
  memory  CPU: peak RSS (VmHWM) of the worker process, with the high-water mark reset after the model and
          the batches are built and one forward pass has run (it creates thread pools and kernel caches that
          every method needs); "extra" = peak - RSS at that moment, the memory the method needs on top of
          the weights. CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats; "extra" =
          that peak - memory_allocated at the reset.
  DiZO    its ordinary steps are timed like ZOSGD's; one projection phase (M inner iterations on fresh
          batches: 2M + 2 forward passes, the loss before and after included) is timed separately, and the
          per-step time is amortised over κ steps: median ordinary step + phase / κ. Its peak covers both the
          ordinary steps and the phase.

What --precision measures, per storage dtype and compute mode (fp32; bf16 and, on CUDA, fp16, each "plain":
weights stored, stepped and computed in it; "exact": stored and computed in it, stepped through dizo.py's fp32
master, half_precision="exact"; "autocast": fp32 weights, the forward under torch.autocast), per weight
scale (0.02, 0.05), ε 1e-3:
  lr-0 drift  T ZOSGD steps at learning rate 0 on the tiny OPT (random init with that weight std): relative
              ‖θ_T - θ_0‖/‖θ_0‖ and max |θ_T - θ_0|. The model must not move; every pass that rounds makes it.
  g error     the T values of g against fp32's on the same seeds.
  fidelity    one step on 1.05M parameters with a closure whose losses give g = 10 exactly: the change
              applied (fp64, from the stored values) against the intended -ηgz, z replayed from the step's
              seed, for lr 1e-7, 1e-6, 1e-5 (ratio of norms, cosine); and the perturbation the two forward
              passes see, (θ+ - θ-)/2, against εz.
  memory      bytes per parameter: storage plus any state the optimizer keeps.
  time        fastest step on the tiny OPT, and fastest step without forward passes on the 1.05M parameters;
              the precisions' steps alternate, and the minimum is kept: other processes only add time.
"""

import argparse
import contextlib
import copy
import ctypes
import functools
import gc
import itertools
import json
import math
import multiprocessing as mp
import os
import platform
import random
import statistics
import sys
import time
import traceback
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import data
from dizo import DiZO, ZOSGD, projected_params, projection_report

# Random-init model shapes. OPT's defaults are facebook/opt-125m's config; roberta-base's config differs from
# RobertaConfig's defaults in max_position_embeddings, type_vocab_size and layer_norm_eps.
SHAPES = {
    "tiny": ("opt", dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, ffn_dim=512,
                         vocab_size=600, word_embed_proj_dim=128, max_position_embeddings=512)),
    "opt-125m": ("opt", dict()),
    "roberta-base": ("roberta", dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                                     layer_norm_eps=1e-5)),
    "opt-1.3b": ("opt", dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192,
                             word_embed_proj_dim=2048)),
}
METHODS = ("inference", "mezo", "zosgd", "rademacher", "dizo", "dizo-host", "fo")
DIZO = ("dizo", "dizo-host")  # anchors beside the matrices; in host memory (anchor_device="cpu")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTOCAST = {"bf16-autocast": torch.bfloat16}  # fp32 weights, the forward under torch.autocast(dtype)
LR_ZO, EPS_ZO, LR_FO = 1e-6, 1e-3, 1e-5  # MeZO's OPT defaults; the values do not change the cost
MASK_FRACTION = 0.15  # masked-LM loss: share of positions masked (BERT's choice)
MiB = 2 ** 20


# ---------------------------------------------------------------------------------------------- model, data

def build_model(shape, device, dtype):
    from transformers import OPTConfig, OPTForCausalLM, RobertaConfig, RobertaForMaskedLM

    family, overrides = SHAPES[shape]
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: a 1.3B fp32 init on the CPU takes minutes
        if family == "opt":
            model = OPTForCausalLM(OPTConfig(**overrides))
        else:
            model = RobertaForMaskedLM(RobertaConfig(**overrides))
    # eval: dropout off, or the two forward passes of a ZO step see different functions.
    return model.to(dtype).eval().requires_grad_(True)


def make_batch(model, batch, seq, gen):
    """Random tokens and the labels of the model's own objective (-100 = position not scored)."""
    cfg = model.config
    longest = cfg.max_position_embeddings - (cfg.pad_token_id + 1 if cfg.model_type == "roberta" else 0)
    if seq > longest:  # RoBERTa's positions start after the padding index
        raise ValueError(f"seq {seq} > {longest}, the longest sequence of this shape")
    ids = torch.randint(4, cfg.vocab_size - 1, (batch, seq), generator=gen)  # no pad/bos/eos/mask tokens
    if cfg.model_type == "roberta":
        masked = torch.rand(batch, seq, generator=gen) < MASK_FRACTION
        labels = torch.where(masked, ids, -100)
        ids = torch.where(masked, cfg.vocab_size - 1, ids)  # the last token plays <mask>, as in roberta-base
    else:  # next-token prediction: position t is scored on token t + 1
        labels = torch.cat([ids[:, 1:], torch.full((batch, 1), -100)], dim=1)
    device = next(model.parameters()).device
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


def loss_fn(model, batch):
    """Cross-entropy of the logits against the labels; flatten is a view, the upcast a no-op in fp32."""
    logits = model(input_ids=batch["input_ids"]).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100)


# ------------------------------------------------------------------------------ the MeZO-style reference

class MeZOStyle:
    """The baseline: a ZO-SGD step written the way the released MeZO code writes it.

    z is regenerated four times per step (+ε, -2ε, +ε to restore, then the update) from the GLOBAL torch RNG,
    re-seeded with torch.manual_seed before each pass, one torch.normal per tensor, and every pass writes
    `p.data = p.data + ...`, allocating a new tensor for each parameter. No weight decay (DiZO's code has none).
    """

    def __init__(self, params, lr, eps, seed=0):
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.eps = lr, eps
        self.seeds = random.Random(seed)

    def _perturb(self, seed, scaling_factor):
        torch.manual_seed(seed)
        for p in self.params:
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            p.data = p.data + scaling_factor * z * self.eps

    @torch.no_grad()
    def step(self, closure):
        seed = self.seeds.randrange(10 ** 9)
        self._perturb(seed, 1)
        loss_plus = closure()
        self._perturb(seed, -2)
        loss_minus = closure()
        self._perturb(seed, 1)
        grad = (float(loss_plus) - float(loss_minus)) / (2 * self.eps)
        torch.manual_seed(seed)
        for p in self.params:
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            p.data = p.data - self.lr * (grad * z)
        return loss_plus


# ------------------------------------------------------------------------------------------------- memory

def _rss_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class TrackedTensors(TorchDispatchMode):
    """The bytes of tensor storage that the ops run under it allocate and that are still referenced, and
    their peak: on the CPU an exact count of a method's own tensors (the resident set also moves with the
    allocator and the rest of the process). Storage that a kernel allocates and frees inside one op is not
    seen, nor storage that only autograd still holds (FO's saved activations): for ZO methods, which run
    under no_grad, it is their whole memory."""

    def __init__(self):
        super().__init__()
        self.live = {}  # storage address -> [bytes, tensors referencing it]
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            address = t.untyped_storage().data_ptr()
            if address not in self.live:
                if address in inputs or address == 0:  # written in place, or a view of older memory
                    continue
                self.live[address] = [t.untyped_storage().nbytes(), 0]
                self.now += self.live[address][0]
                self.peak = max(self.peak, self.now)
            self.live[address][1] += 1
            weakref.finalize(t, self._release, address)
        return out

    def _release(self, address):
        entry = self.live[address]
        entry[1] -= 1
        if entry[1] == 0:
            del self.live[address]
            self.now -= entry[0]


class PeakMemory:
    """Peak memory of whatever runs after reset(): the CUDA allocator's peak, or the process's peak RSS."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.baseline = 0
        self.hwm_reset = True

    def reset(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            return
        try:  # hand freed heap back to the OS, so that the baseline is not inflated by the build's garbage
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.baseline = _rss_bytes("VmRSS")
        try:  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.hwm_reset = False  # the peak then includes building the model: an upper bound

    def peak(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return _rss_bytes("VmHWM")


# ------------------------------------------------------------------------------------------------- timing

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, warmup, repeats, device):
    """Seconds of each of `repeats` calls of step(), after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def make_step(method, model, batch, fresh, args):
    """(step function, optimizer) of `method` on `model`: one forward pass for "inference", one training
    step otherwise. DiZO's step is its ordinary ZO step; its projection phase is timed apart."""
    def loss(b):
        dtype = AUTOCAST.get(args.dtype)
        with torch.autocast(args.device, dtype=dtype, enabled=dtype is not None):
            return loss_fn(model, b)

    def closure():
        return loss(batch)

    params = model.parameters()
    if method == "inference":
        return torch.no_grad()(lambda: float(closure())), None
    if method == "fo":
        opt = torch.optim.AdamW(params, lr=LR_FO)

        def fo_step():
            opt.zero_grad(set_to_none=True)
            loss = closure()
            loss.backward()
            opt.step()
            return float(loss.detach())
        return fo_step, opt
    if method == "mezo":
        opt = MeZOStyle(params, lr=LR_ZO, eps=EPS_ZO)
    elif method in ("zosgd", "rademacher"):
        opt = ZOSGD(params, lr=LR_ZO, eps=EPS_ZO, direction="gaussian" if method == "zosgd" else method)
    else:
        if args.warmup + args.repeats >= args.kappa:
            raise ValueError("warmup + repeats must be < kappa: DiZO's ordinary steps are timed without a phase")
        opt = DiZO(params, projected_params(model), lr=LR_ZO, eps=EPS_ZO, interval=args.kappa,
                   proj_iters=args.proj_iters, search_data=fresh, search_loss=loss,
                   anchor_device="cpu" if method == "dizo-host" else None)
    return (lambda: opt.step(closure)), opt


def dizo_report(opt):
    """What DiZO projects: projection_report plus the largest projected matrix in bytes."""
    pairs = list(zip(opt.names, opt.matrices))
    return {**projection_report(pairs), "largest_matrix_bytes": max(t.numel() * t.element_size() for t in opt.matrices)}


def time_phase(opt, device):
    """Seconds of one DiZO projection phase: what step() runs after every κ-th ZO step."""
    _sync(device)
    t0 = time.perf_counter()
    opt.project(opt._search_closure)
    _sync(device)
    return time.perf_counter() - t0


_NORMAL_BLOCK = 1 << 16  # --profile times normal_ over the model's size in blocks of this many entries


def profile_zo_step(model, args, device):
    """A ZO step's own work, without its forward passes: each method's step with a closure that returns a
    constant (z drawn and added, three passes for ZOSGD, four for MeZO-style), at lr 0, in 3 x --repeats
    interleaved rounds; seconds per step (median). Far shorter than a forward pass, so its median is
    steadier than that of a whole step on a busy machine."""
    steps = {"mezo": MeZOStyle(copy.deepcopy(model).parameters(), lr=0.0, eps=EPS_ZO),  # see timing_worker
             "zosgd": ZOSGD(model.parameters(), lr=0.0, eps=EPS_ZO),
             "rademacher": ZOSGD(model.parameters(), lr=0.0, eps=EPS_ZO, direction="rademacher")}
    times = {m: [] for m in steps}
    for _ in range(1 + 3 * args.repeats):  # the first round allocates the buffers
        for m, opt in steps.items():
            times[m] += time_steps(lambda: opt.step(lambda: 0.0), 0, 1, device)
    out = {m: statistics.median(t[1:]) for m, t in times.items()}
    if device.type == "cpu":  # torch's CPU normal_ runs on one core: the floor of drawing z
        n, buf = sum(p.numel() for p in model.parameters()), torch.empty(_NORMAL_BLOCK)
        gen = torch.Generator().manual_seed(0)
        draw = [time_steps(lambda: [buf[:min(_NORMAL_BLOCK, n - i)].normal_(generator=gen)
                                    for i in range(0, n, _NORMAL_BLOCK)], 0, 1, device)[0] for _ in range(3)]
        out["normal_"] = min(draw)
    return out


def setup(shape, args):
    """The model of `shape` in args.dtype, its batch, M fresh batches for DiZO's search, after one forward
    pass (it creates thread pools and kernel caches that every method needs)."""
    torch.set_num_threads(args.threads)
    model = build_model(shape, torch.device(args.device), DTYPES.get(args.dtype, torch.float32))
    gen = torch.Generator().manual_seed(1)
    batch = make_batch(model, args.batch, args.seq, gen)
    fresh = [make_batch(model, args.batch, args.seq, gen) for _ in range(args.proj_iters)]
    with torch.no_grad():
        float(loss_fn(model, batch))
    return model, batch, fresh


def timing_worker(shape, methods, args):
    """Every method's step on one model in one process, in rounds of one step of each (after --warmup
    rounds): other load on the machine hits every method alike, so their ratios hold. DiZO's projection
    phase is timed once, after the rounds."""
    args = with_default_repeats(shape, args)
    device = torch.device(args.device)
    model, batch, fresh = setup(shape, args)
    # MeZO-style steps replace every parameter by a new tensor (p.data = ...): on a model of their own, so
    # that the other methods' weights stay where they were allocated (measured: a ZOSGD step interleaved
    # with MeZO-style steps on the same model, Rademacher z, took 1.7x as long on the CPU)
    steps = {m: make_step(m, copy.deepcopy(model) if m == "mezo" else model, batch, fresh, args) for m in methods}
    times = {m: [] for m in methods}
    for i in range(args.warmup + args.repeats):
        for m, (step, _) in steps.items():
            seconds = time_steps(step, 0, 1, device)[0]
            if i >= args.warmup:
                times[m].append(seconds)
    out = {"shape": shape, "dtype": args.dtype, "device": args.device, "threads": args.threads,
           "repeats": args.repeats, "warmup": args.warmup,
           "times_s": times, "median_s": {m: statistics.median(t) for m, t in times.items()}}
    for m in DIZO:
        if m in steps:
            opt = steps[m][1]
            out[m] = {"phase_s": time_phase(opt, device), "kappa": args.kappa, "proj_iters": args.proj_iters,
                      **dizo_report(opt)}
    if args.profile:
        out["own_work_s"] = profile_zo_step(model, args, device)
    return out


def memory_worker(shape, method, args):
    """One method in this process: build, one forward, reset the peak, --warmup + 1 steps (and for DiZO
    a projection phase), read the peak; on the CPU also the peak of the method's tracked tensors."""
    args = argparse.Namespace(**{**vars(args), "repeats": 1})
    device = torch.device(args.device)
    model, batch, fresh = setup(shape, args)
    params = list(model.parameters())
    mem, tracked = PeakMemory(device), TrackedTensors()
    mem.reset()
    with tracked if device.type == "cpu" else contextlib.nullcontext():
        step, opt = make_step(method, model, batch, fresh, args)
        time_steps(step, args.warmup, 1, device)
        info = {}
        if method in DIZO:
            time_phase(opt, device)
            info = dizo_report(opt)
    peak = mem.peak()
    if device.type == "cpu" and method != "fo":  # FO's saved activations are held by autograd, unseen
        info["tracked_peak_bytes"] = tracked.peak
    return {"shape": shape, "method": method, "dtype": args.dtype, "peak_bytes": peak,
            "baseline_bytes": mem.baseline, "extra_bytes": peak - mem.baseline, "hwm_reset": mem.hwm_reset,
            "n_params": sum(p.numel() for p in params),
            "param_bytes": sum(p.numel() * p.element_size() for p in params),
            "largest_tensor_bytes": max(p.numel() * p.element_size() for p in params), **info}


# ------------------------------------------------------------------------------------------------ report

def _mb(n):
    return f"{n / MiB:,.0f}"


LABELS = {"inference": "inference (one forward)", "mezo": "MeZO-style", "zosgd": "ZOSGD (Gaussian z)",
          "rademacher": "ZOSGD (Rademacher z)", "dizo": "DiZO (amortised)",
          "dizo-host": "DiZO, anchors on the host (amortised)", "fo": "FO (AdamW)"}


def amortised(timing, method):
    """DiZO's seconds per step over κ steps: median ordinary step + phase / κ."""
    d = timing[method]
    return timing["median_s"][method] + d["phase_s"] / d["kappa"]


def table(timing, memory):
    """One row per (shape, method): median s/step from the interleaved rounds, its ratios to two forward
    passes and to ZOSGD, and the method's memory from its own process (tracked: the CPU count of its
    tensors, see TrackedTensors)."""
    lines = ["| shape | dtype | method | median s/step | ÷ two forwards | ÷ ZOSGD | extra MB | tracked MB "
             "| peak MB |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    mem = {(r["shape"], r["dtype"], r["method"]): r for r in memory}
    for t in timing:
        med = {m: amortised(t, m) if m in DIZO else s for m, s in t["median_s"].items()}
        for m, s in med.items():
            two = f"{s / (2 * med['inference']):.2f}" if "inference" in med else "-"
            zo = f"{s / med['zosgd']:.2f}" if "zosgd" in med else "-"
            r = mem.get((t["shape"], t["dtype"], m))
            extra, peak = (_mb(r["extra_bytes"]), _mb(r["peak_bytes"])) if r else ("-", "-")
            tracked = _mb(r["tracked_peak_bytes"]) if r and "tracked_peak_bytes" in r else "-"
            lines.append(f"| {t['shape']} | {t['dtype']} | {LABELS[m]} | {s:.4g} | {two} | {zo} | {extra} "
                         f"| {tracked} | {peak} |")
    return "\n".join(lines)


def ratios(t, memory):
    """The ratios of issue #13 and #12 for one timing row, and the memory differences of its shape."""
    med, out = t["median_s"], []
    tag = f"[{t['shape']} {t['dtype']}]"
    two = 2 * med["inference"] if "inference" in med else None
    zos = [(m, med[m]) for m in ("zosgd", "rademacher") if m in med]
    if two:
        out += [f"{tag} {LABELS[m]} step / two forwards = {s / two:.2f}" for m, s in zos]
    if "mezo" in med:
        out += [f"{tag} MeZO-style / {LABELS[m]} = {med['mezo'] / s:.2f}" for m, s in zos]
    for m in (m for m in DIZO if m in med and "zosgd" in med and two):
        d, forward = t[m], med["inference"]
        extra = (2 * d["proj_iters"] + 2) / d["kappa"] * forward  # the phase's 2M + 2 forward passes per step
        bound = med["zosgd"] + extra
        out.append(f"{tag} {LABELS[m]} {amortised(t, m):.4g} s (ordinary step {med[m]:.4g} s + phase "
                   f"{d['phase_s']:.4g} s = {d['phase_s'] / ((2 * d['proj_iters'] + 2) * forward):.2f} x its "
                   f"2M+2 forwards, / κ={d['kappa']}, M={d['proj_iters']}) / (ZOSGD {med['zosgd']:.4g} s + "
                   f"(2M+2)/κ forwards {extra:.4g} s) = {amortised(t, m) / bound:.3f}")
    if "own_work_s" in t and two:
        own = dict(t["own_work_s"])
        draw = own.pop("normal_", None)
        out.append(f"{tag} own work per step, without forward passes: " + ", ".join(
            f"{LABELS[m]} {s:.4g} s" for m, s in own.items()) + "; two forwards + own work, / two forwards: "
            + ", ".join(f"{LABELS[m]} {(two + s) / two:.2f}" for m, s in own.items()))
        if draw is not None:
            floor = 3 * draw / t["threads"]
            out.append(f"{tag} normal_ over every parameter on one core {draw:.4g} s; three draws a step shared by "
                       f"{t['threads']} threads take at least {floor:.4g} s, so a Gaussian ZO step is at least "
                       f"{(two + floor) / two:.2f} x two forwards with torch's CPU generator")
    mem = {r["method"]: r for r in memory if (r["shape"], r["dtype"]) == (t["shape"], t["dtype"])}
    kinds = [("extra_bytes", "allocator peak" if t["device"] == "cuda" else "RSS"),
             ("tracked_peak_bytes", "tracked tensors")]
    for key, kind in kinds:
        mem = {m: r for m, r in mem.items() if key in r}
        if "zosgd" in mem and "inference" in mem:
            zo, inf = mem["zosgd"], mem["inference"]
            out.append(f"{tag} memory ({kind}) ZO - inference = {_mb(zo[key] - inf[key])} MB; largest tensor "
                       f"{_mb(zo['largest_tensor_bytes'])} MB")
        for m in (m for m in DIZO if m in mem and "zosgd" in mem):
            dz = mem[m]
            diff = dz[key] - mem["zosgd"][key]
            out.append(f"{tag} memory ({kind}) {m} - ZO = {_mb(diff)} MB = {diff / dz['anchor_bytes']:.2f} x "
                       f"anchor ({_mb(dz['anchor_bytes'])} MB: {dz['matrices']} matrices, {dz['params'] / 1e6:.2f}M "
                       f"params) = {diff / dz['largest_matrix_bytes']:.2f} x the largest projected matrix")
    if "fo" in mem and "zosgd" in mem:
        out.append(f"{tag} peak memory FO / ZO = {mem['fo']['peak_bytes'] / mem['zosgd']['peak_bytes']:.2f}")
    return out


def machine(args):
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
            "cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ---------------------------------------------------------------- a train.py run's table and figures

def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    """Write a figure atomically, then free it."""
    fig.tight_layout()
    data.write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format=path.suffix[1:]))
    pyplot().close(fig)


def plot_curves(results, path):
    """Dev accuracy and training loss against steps, one line per method."""
    fig, (ax_acc, ax_loss) = pyplot().subplots(1, 2, figsize=(10, 3.8))
    for method, r in results["methods"].items():
        hist = [h for h in r["history"] if h["dev_acc"] is not None]
        ax_acc.plot([h["step"] for h in hist], [h["dev_acc"] for h in hist], marker=".", label=method)
        hist = [h for h in r["history"] if h["loss"] is not None]
        ax_loss.plot([h["step"] for h in hist], [h["loss"] for h in hist], label=method)
    ax_acc.set(xlabel="step", ylabel="dev accuracy", title="dev accuracy")
    ax_loss.set(xlabel="step", ylabel="training loss (mean since last eval)", title="training loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def plot_divergence(results, path):
    """One panel per method: ‖W_T - W_0‖ of Q, K, V, O per layer at the last evaluation, each divided by
    √(entries), so that ZO's size-only movement (η|g|√n per step, DiZO §2.2) shows as flat lines."""
    methods = [(m, r) for m, r in results["methods"].items() if "divergence" in r["history"][-1]]
    fig, axes = pyplot().subplots(1, len(methods), figsize=(4 * len(methods), 3.4), squeeze=False, sharey=True)
    for ax, (method, r) in zip(axes[0], methods):
        last = r["history"][-1]
        for role, dists in last["divergence"].items():
            per_entry = [d / math.sqrt(n) for d, n in zip(dists, r["matrix_sizes"][role])]
            ax.plot(range(len(dists)), per_entry, marker="o", label=role.upper())
        ax.set(title=f"{method}, step {last['step']}", xlabel="layer", yscale="log", xticks=range(len(dists)))
        ax.grid(alpha=0.3, which="both")
        ax.legend(ncol=4, fontsize=8)
    axes[0][0].set_ylabel("‖W - W0‖ / √entries")
    save_figure(fig, path)


def _short_name(name):
    """'model.decoder.layers.2.self_attn.k_proj.weight' -> '2 k_proj': the layer and what follows its block."""
    parts = name.replace(".weight", "").replace(".default", "").split(".")
    layer = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    return name if layer is None else f"{parts[layer]} {'.'.join(parts[layer + 2:])}"


def plot_projection(results, path):
    """What DiZO's projection phases did (§3), per method that projected: the ratio r_l chosen for every
    projected matrix at every phase (rows: matrices in module order, e.g. K and V of each layer; columns:
    phases; 1 = left as it was), and the loss on the phase's first search batch before and after it."""
    runs = [(m, r) for m, r in results["methods"].items() if r.get("projection")]
    fig, axes = pyplot().subplots(len(runs), 2, figsize=(12, 0.5 + 3.5 * len(runs)), squeeze=False,
                                  gridspec_kw={"width_ratios": (3, 2)})
    for (method, r), (ax_r, ax_loss) in zip(runs, axes):
        phases = r["projection"]
        steps = [p["step"] for p in phases]
        ratios = torch.tensor([p["ratios"] for p in phases]).T.tolist()  # [matrix][phase]
        spread = max(max(abs(x - 1) for row in ratios for x in row), 1e-3)
        image = ax_r.imshow(ratios, aspect="auto", interpolation="nearest", cmap="RdBu_r", vmin=1 - spread,
                            vmax=1 + spread)
        names = [_short_name(n) for n in r["projected"]]
        every = max(1, len(names) // 20)  # at most 20 labels
        ax_r.set_yticks(range(0, len(names), every), names[::every], fontsize=6)
        every = max(1, len(steps) // 12)  # at most 12 labels
        ax_r.set_xticks(range(0, len(steps), every), steps[::every], fontsize=7)
        ax_r.set(title=f"{method}: ratio r = γ/‖θ−θ0‖ chosen per matrix", xlabel="after step")
        fig.colorbar(image, ax=ax_r)
        change = [100 * (p["loss_after"] / p["loss_before"] - 1) for p in phases]
        ax_loss.bar(steps, change, width=0.6 * (steps[1] - steps[0]) if len(steps) > 1 else 1.0,
                    color=["tab:green" if c < 0 else "tab:red" for c in change])
        ax_loss.axhline(0, color="gray", lw=0.8)
        ax_loss.set(title=f"{method}: loss change on the phase's first batch", xlabel="step",
                    ylabel="after / before − 1 (%)")
        ax_loss.grid(alpha=0.3)
    save_figure(fig, path)


def print_table(results):
    """train.py's end-of-run summary, one row per method."""
    def cell(r, key, fmt="{:.3f}"):
        return fmt.format(r[key]) if r.get(key) is not None else "-"

    rows = [("method", "zero-shot", "best dev", "test", "steps", "fwd passes", "train s", "peak MB", "status")]
    for method, r in results["methods"].items():
        rows.append((method, cell(r, "zero_shot_acc"), cell(r, "best_dev_acc"), cell(r, "test_acc"),
                     str(r["steps"]), str(r["forward_passes"]), cell(r, "wall_s", "{:.1f}"),
                     cell(r, "peak_mem_mb", "{:.0f}"), r["status"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def plot_run(results, folder):
    """The figures of a train.py run, in `folder`: curves, and divergence and projection where recorded;
    returns their names."""
    methods = results["methods"]
    figures = {"curves.png": plot_curves}
    if any(r.get("history") and "divergence" in r["history"][-1] for r in methods.values()):
        figures["divergence.png"] = plot_divergence
    if any(r.get("projection") for r in methods.values()):
        figures["projection.png"] = plot_projection
    for name, plot in figures.items():
        plot(results, folder / name)
    return list(figures)


def replot(folder):
    """Draw the figures train.py draws for the run in `folder`, from its results.json alone."""
    try:
        results = json.loads((folder / "results.json").read_text())
        results["methods"].items()
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise SystemExit(f"error: {folder} holds no readable train.py results.json ({type(e).__name__}: {e})")
    print(f"drew {', '.join(plot_run(results, folder))} in {folder}")


# ------------------------------------------------------------------------------------- precision study

PRECISION_SCALES = (0.02, 0.05)  # typical std of an LLM's weight matrices
PRECISION_LRS = (1e-7, 1e-6, 1e-5)  # around MeZO's ZO lr of 1e-6
KNOWN_G = 10.0  # |g| typical of an LLM at the start of fine-tuning
FIDELITY_SHAPES = ((512, 512),) * 4 + ((512,),) * 4  # one layer's worth: 4 matrices, 2 biases, 2 LayerNorm weights


@dataclass(frozen=True)
class Precision:
    """How a ZO step stores and computes the parameters.

    storage    dtype of the model's parameters
    autocast   dtype of the forward under torch.autocast; None: the forward computes in the storage dtype
    optimizer  builds the ZO optimizer, with ZOSGD's signature; any companion state lives in its .state[p]
    z_dtype    dtype the optimizer draws z in; None: each parameter's own dtype, as ZOSGD
    values     (optimizer, params) -> the values the optimizer updates, one tensor per parameter; None: the
               parameters themselves (a policy that keeps more precision than the parameters returns that)
    """
    name: str
    storage: torch.dtype
    autocast: torch.dtype | None = None
    optimizer: Callable = ZOSGD
    z_dtype: torch.dtype | None = None
    values: Callable | None = None


def half_precisions(halves):
    """fp32; and per half dtype in `halves`: plain (weights stored, stepped and computed in it), exact (stored
    and computed in it, stepped through an fp32 master: dizo.py's default) and autocast (fp32 weights, the
    forward under torch.autocast)."""
    plain = functools.partial(ZOSGD, half_precision="plain")
    modes = [Precision("fp32", torch.float32)]
    for h in halves:
        modes += [Precision(f"{h} plain", DTYPES[h], optimizer=plain),
                  Precision(f"{h} exact", DTYPES[h], z_dtype=torch.float32, values=master_values),
                  Precision(f"{h} autocast", torch.float32, DTYPES[h])]
    return modes


def master_values(opt, params):
    """The fp32 values dizo.py steps for half-precision parameters under half_precision="exact"."""
    return [opt.exact_value(p) for p in params]


def fidelity_params(scale, dtype, device, seed=0):
    """One layer's worth of parameters (1.05M): matrices and biases ~ N(0, scale²), LayerNorm weights of 1."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for i, shape in enumerate(FIDELITY_SHAPES):
        t = torch.ones(shape) if i >= 6 else torch.randn(shape, generator=gen) * scale
        params.append(torch.nn.Parameter(t.to(device, dtype)))
    return params


def first_step_seed(seed):
    """The seed of ZOSGD(seed=seed)'s first step: one 62-bit draw from Generator(seed) (dizo.py)."""
    return int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(seed)))


def replayed_z(params, step_seed, dtype):
    """z of one step, regenerated from its seed as ZOSGD documents it: one generator on the parameters' device,
    tensors in order, each drawn in `dtype` (None: the parameter's own); on a CPU a tensor of more than
    2^16 entries takes a 62-bit seed s from that generator and its chunk k of 2^16 entries comes from s + k."""
    gen, out = torch.Generator(device=params[0].device).manual_seed(step_seed), []
    for p in params:
        z = torch.empty(p.numel(), device=p.device, dtype=dtype or p.dtype)
        if p.device.type != "cpu" or p.numel() <= 2**16:
            z.normal_(generator=gen)
        else:
            s = int(torch.randint(0, 2**62, (1,), generator=gen))
            for k, chunk in enumerate(z.split(2**16)):
                chunk.normal_(generator=torch.Generator().manual_seed(s + k))
        out.append(z.view(p.shape))
    return out


def flat64(tensors):
    return torch.cat([t.detach().double().flatten() for t in tensors])


def updated_values(prec, opt, params):
    """The values the optimizer updates, flattened in fp64: its own state if it keeps one, else θ."""
    return flat64(prec.values(opt, params) if prec.values is not None else params)


def known_g_closure(eps, g=KNOWN_G):
    """A closure without a forward pass whose two losses are ℓ+ = gε, ℓ- = -gε: (ℓ+ - ℓ-)/(2ε) = g."""
    losses = itertools.cycle((g * eps, -g * eps))
    return lambda: next(losses)


def bytes_per_param(opt, params):
    """Parameter storage plus every tensor the optimizer keeps in .state, per parameter."""
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    n = sum(p.numel() for p in params)
    return (sum(p.numel() * p.element_size() for p in params) + state) / n


def ratio_cosine(actual, wanted):
    """‖actual‖ / ‖wanted‖ and the cosine between them (0 where `actual` is zero)."""
    norm = actual.norm() * wanted.norm()
    return {"ratio": float(actual.norm() / wanted.norm()),
            "cosine": float(actual @ wanted / norm) if norm > 0 else 0.0}


def step_fidelity(prec, scale, lr, eps, device):
    """One ZO step with g = KNOWN_G on the fidelity parameters, z replayed from the step's seed.

    update        the change applied to the values the optimizer updates, computed in fp64 from the stored
                  values, against the intended -ηgz
    perturbation  what the two forward passes see, (θ+ - θ-)/2 from the stored weights, against εz
    """
    params = fidelity_params(scale, prec.storage, device)
    opt = prec.optimizer(params, lr=lr, eps=eps, seed=0)
    before, seen, known = updated_values(prec, opt, params), [], known_g_closure(eps)

    def closure():
        seen.append(flat64(params))
        return known()

    opt.step(closure)
    z = flat64(replayed_z(params, first_step_seed(0), prec.z_dtype))
    return {"update": ratio_cosine(updated_values(prec, opt, params) - before, -lr * KNOWN_G * z),
            "perturbation": ratio_cosine((seen[0] - seen[1]) / 2, eps * z),
            "bytes_per_param": bytes_per_param(opt, params)}


def optimizer_step_seconds(precisions, eps, device, repeats):
    """Fastest of `repeats` ZO steps on the fidelity parameters with the known-g closure, per precision: the
    three passes over the parameters without a forward pass, i.e. the cost of the policy itself. Steps of the
    precisions alternate, and the minimum is kept: other processes' load only ever adds time."""
    runs = []
    for prec in precisions:
        opt = prec.optimizer(fidelity_params(PRECISION_SCALES[0], prec.storage, device), lr=PRECISION_LRS[1],
                             eps=eps, seed=0)
        runs.append((opt, known_g_closure(eps)))
    times = [[] for _ in runs]
    for i in range(repeats + 1):  # the first round is a warmup: buffers are allocated there
        for (opt, closure), t in zip(runs, times):
            t.extend(time_steps(lambda: opt.step(closure), 0, 1, device)[i > 0:])
    return [min(t) for t in times]


def lr0_drift(runs, eps, steps, device):
    """`steps` ZO steps at lr 0, which must leave each model where it was; runs = [(precision, model, batch)],
    stepped in turn (alternating, for fair times). Per run: relative drift ‖θ_T - θ_0‖/‖θ_0‖ and max |θ_T - θ_0|
    of the parameters (what a saved model holds) and of the values the optimizer updates; each step's g; the
    fastest step's seconds (two real forward passes and the policy's passes; load only ever adds time)."""
    states = []
    for prec, model, batch in runs:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = prec.optimizer(params, lr=0.0, eps=eps, seed=0)
        states.append(dict(prec=prec, opt=opt, params=params, weights0=flat64(params),
                           values0=updated_values(prec, opt, params), grads=[], times=[],
                           closure=autocast_closure(prec, model, batch, device)))
    for _ in range(steps):
        for s in states:
            s["times"] += time_steps(lambda: s["opt"].step(s["closure"]), 0, 1, device)
            s["grads"].append(s["opt"].projected_grad)
    results = []
    for s in states:
        weights = flat64(s["params"]) - s["weights0"]
        values = updated_values(s["prec"], s["opt"], s["params"]) - s["values0"]
        results.append({"steps": steps, "drift": float(weights.norm() / s["weights0"].norm()),
                        "max_abs": float(weights.abs().max()),
                        "state_drift": float(values.norm() / s["values0"].norm()),
                        "grads": s["grads"], "step_s": min(s["times"]),
                        "bytes_per_param": bytes_per_param(s["opt"], s["params"])})
    return results


def autocast_closure(prec, model, batch, device):
    """The model's loss on the batch, under torch.autocast when the precision asks for it."""
    def closure():
        with torch.autocast(device.type, dtype=prec.autocast, enabled=prec.autocast is not None):
            return loss_fn(model, batch)
    return closure


def drift_model(scale, prec, device):
    """The tiny OPT, randomly initialised with weight std `scale` (fp32, then cast: every mode starts from the
    same weights up to rounding), in eval mode, with its batch."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(**SHAPES["tiny"][1], init_std=scale))
    model = model.to(device, prec.storage).eval().requires_grad_(True)
    return model, make_batch(model, 4, 32, torch.Generator().manual_seed(1))


def precision_study(precisions, args):
    """Every measurement for every (precision, scale): lr-0 drift and g on the tiny OPT, fidelity per lr,
    and the optimizer's time."""
    device = torch.device(args.device)
    warnings.filterwarnings("ignore", message="half_precision='plain'")  # the plain rows measure what it says
    optimizer_s = optimizer_step_seconds(precisions, EPS_ZO, device, args.repeats or 20)
    rows = []
    for scale in PRECISION_SCALES:
        runs = [(prec, *drift_model(scale, prec, device)) for prec in precisions]
        for prec, secs, lr0 in zip(precisions, optimizer_s, lr0_drift(runs, EPS_ZO, args.drift_steps, device)):
            rows.append({"precision": prec.name, "scale": scale, "eps": EPS_ZO, "optimizer_step_s": secs,
                         "lr0": lr0,
                         "fidelity": {lr: step_fidelity(prec, scale, lr, EPS_ZO, device) for lr in PRECISION_LRS}})
            print(f"  {prec.name:>14} scale {scale}: lr-0 drift {lr0['drift']:.3g}", file=sys.stderr, flush=True)
    return rows


def precision_tables(rows):
    """Two markdown tables: lr-0 drift, g, memory and time per (precision, scale); update fidelity per lr."""
    base = rows[0]  # the first precision (fp32) is the reference of g and of the times
    ref = base["precision"]
    base_g = {r["scale"]: torch.tensor(r["lr0"]["grads"]) for r in rows if r["precision"] == ref}
    steps = base["lr0"]["steps"]
    out = [f"lr 0, T = {steps} ZO steps on the tiny OPT (ε {base['eps']:g}): drift = ‖θ_T - θ_0‖/‖θ_0‖ of the "
           f"weights (state: of the values the optimizer updates); g error = ‖g - g_{ref}‖ / ‖g_{ref}‖ over the same "
           f"seeds; step s: fastest step, two forward passes included; optimizer s: fastest step without forward "
           f"passes on {sum(math.prod(s) for s in FIDELITY_SHAPES) / 1e6:.2f}M parameters\n",
           "| precision | scale | bytes/param | drift after T | drift / step | max abs Δ | state drift | g error "
           f"| step s (÷ {ref}) | optimizer s (÷ {ref}) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        d, g = r["lr0"], torch.tensor(r["lr0"]["grads"])
        g_err = float((g - base_g[r["scale"]]).norm() / base_g[r["scale"]].norm())
        t, t0 = d["step_s"], next(b["lr0"]["step_s"] for b in rows
                                   if b["precision"] == ref and b["scale"] == r["scale"])
        o, o0 = r["optimizer_step_s"], base["optimizer_step_s"]
        out.append(f"| {r['precision']} | {r['scale']:g} | {d['bytes_per_param']:g} | {d['drift']:.3g} "
                   f"| {d['drift'] / steps:.3g} | {d['max_abs']:.3g} | {d['state_drift']:.3g} | {g_err:.3g} "
                   f"| {t:.4f} ({t / t0:.2f}) | {o:.4f} ({o / o0:.2f}) |")
    lrs = list(rows[0]["fidelity"])
    out += [f"\nOne ZO step with g = {KNOWN_G:g}: the perturbation the forward passes see, (θ+ - θ-)/2 of the stored "
            f"weights, against εz; the change applied (fp64, from the stored values) against the intended -ηgz. "
            f"Ratio of norms (cosine)\n",
            "| precision | scale | perturbation | " + " | ".join(f"update, lr {lr:g}" for lr in lrs) + " |",
            "|---|---:|---:|" + "---:|" * len(lrs)]
    for r in rows:
        f = list(r["fidelity"].values())
        out.append(f"| {r['precision']} | {r['scale']:g} | {_ratio_cos(f[0]['perturbation'])} | "
                   + " | ".join(_ratio_cos(x["update"]) for x in f) + " |")
    return "\n".join(out)


def _ratio_cos(rc):
    x = rc["ratio"]
    return (f"{x:.3f}×" if x < 10 else f"{x:.1f}×") + f" ({rc['cosine']:.3f})"


def precision_main(args, precisions):
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = precision_study(precisions, args)
    info = machine(args)
    print(f"\n{args.device}, torch {info['torch']}, {info['threads']} threads on {info['cpu_count']} cores "
          f"({info.get('gpu', info['cpu'])}); {time.perf_counter() - start:.0f} s in all\n")
    print(precision_tables(rows))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "machine": info, "rows": rows}, f, indent=1)
    print(f"\nwrote {args.out}")


# ------------------------------------------------------------------------------------ convergence study

def load_study(folder):
    """{run group: [per-seed result of its one method]} from folder/<group>-s<seed>/results.json."""
    groups = {}
    for path in sorted(Path(folder).glob("*/results.json")):
        group = path.parent.name.rsplit("-s", 1)[0]
        results = json.loads(path.read_text())
        for r in results["methods"].values():
            if r.get("status") == "done":
                groups.setdefault(group, []).append(r)
    return groups


def first_reaching(r, target):
    """The first evaluation whose dev accuracy is >= target, or None."""
    return next((h for h in r["history"] if h["dev_acc"] is not None and h["dev_acc"] >= target), None)


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return "never"
    mean, std = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
    if std == 0:
        return f"{mean:.4g} ± 0"
    digits = max(0, 1 - math.floor(math.log10(std)))  # both to the std's second significant digit
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def study(folder, target, plot):
    """Steps, forward passes and training seconds to reach `target` dev accuracy, and test accuracy, per
    group (mean ± std over seeds); and the mean dev-accuracy curves with a ±1 std band."""
    groups = load_study(folder)
    if not groups:
        sys.exit(f"no finished runs in {folder}/*/results.json")
    print(f"| run | seeds | zero-shot test | steps to dev ≥ {target} (reached) | forward passes | train s "
          f"| final test acc | best dev acc |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for group, runs in groups.items():
        hits = [first_reaching(r, target) for r in runs]
        reached = [h for h in hits if h is not None]
        print(f"| {group} | {len(runs)} | {mean_std([r['zero_shot_acc'] for r in runs])} "
              f"| {mean_std([h['step'] for h in reached])} ({len(reached)}/{len(runs)}) "
              f"| {mean_std([h.get('forward_passes') for h in reached])} "
              f"| {mean_std([h.get('wall_s') for h in reached])} "
              f"| {mean_std([r['test_acc'] for r in runs])} | {mean_std([r['best_dev_acc'] for r in runs])} |")
    fig, ax = pyplot().subplots(figsize=(7, 4))
    for group, runs in groups.items():
        steps = [h["step"] for h in runs[0]["history"] if h["dev_acc"] is not None]
        curves = torch.tensor([[h["dev_acc"] for h in r["history"] if h["dev_acc"] is not None][:len(steps)]
                               for r in runs])
        mean, std = curves.mean(0), curves.std(0) if len(runs) > 1 else torch.zeros(len(steps))
        if len(runs) > 1:  # the main comparison: thick, with its band
            line, = ax.plot(steps, mean, lw=2, label=f"{group} ({len(runs)} seeds)")
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2, color=line.get_color())
        else:  # a one-seed variant of the tuning sweep
            ax.plot(steps, mean, lw=0.8, ls="--", label=f"{group} (1 seed)")
    ax.axhline(target, color="gray", lw=0.8, ls="--")
    ax.set(xlabel="step", ylabel="dev accuracy", title="embedded task: mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, Path(plot))
    print(f"\nwrote {plot}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="tiny,opt-125m,roberta-base",
                   help=f"comma-separated, from {', '.join(SHAPES)}")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from " + ", ".join(METHODS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--repeats", type=int, default=None,
                   help="timed rounds, one step of every method each (default: 10 for tiny, 3 for the others, "
                        "on CPU; 10 on CUDA)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES) + tuple(AUTOCAST),
                   help="weights' dtype (bf16 and fp16 stepped through dizo.py's fp32 master); bf16-autocast: "
                        "fp32 weights, forward passes under torch.autocast")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads in every worker (default 2; with --precision 1: its tensors are "
                        "small, and a second thread that waits for a busy core slows a step many times)")
    p.add_argument("--kappa", type=int, default=50, help="DiZO interval κ for the amortisation (released: 50)")
    p.add_argument("--proj-iters", type=int, default=10, help="DiZO M, inner iterations per phase (released: 10)")
    p.add_argument("--profile", action="store_true",
                   help="also time each ZO method's own work (its passes over the parameters) without forward "
                        "passes, in rounds of its own")
    p.add_argument("--out", default=None,
                   help="JSON of every row (runs/ is git-ignored; default runs/bench.json, "
                        "with --precision runs/precision.json)")
    p.add_argument("--precision", action="store_true",
                   help="instead of timing shapes, measure ZO under each storage dtype and compute mode "
                        "(fp32, bf16, fp16 on CUDA; plain, exact or autocast): lr-0 drift, update fidelity, "
                        "memory")
    p.add_argument("--drift-steps", type=int, default=20, help="--precision: ZO steps at lr 0 (T)")
    p.add_argument("--gpu-check", action="store_true",
                   help="every GPU figure (OPT-1.3B shape: step times in bf16, fp16, fp32; memory; precision "
                        "study) in one run of at most 8 minutes on an H100")
    p.add_argument("--dry-run", action="store_true", help="--gpu-check on the CPU with the tiny shape")
    p.add_argument("--study", metavar="DIR", default=None,
                   help="instead of benchmarking, summarise train.py runs DIR/<run>-s<seed>/ (README)")
    p.add_argument("--target", type=float, default=0.85, help="--study: dev accuracy to reach")
    p.add_argument("--plot", default="runs/convergence.png", help="--study: the figure")
    p.add_argument("--replot", metavar="DIR", default=None,
                   help="instead of benchmarking, redraw a train.py run's figures (curves.png, divergence.png, "
                        "projection.png) in DIR from its results.json")
    add_ablation_flags(p)
    args = p.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be >= 1")
    for s in args.shapes.split(","):
        if s not in SHAPES:
            p.error(f"unknown shape {s!r}; choose from {', '.join(SHAPES)}")
    for m in args.methods.split(","):
        if m not in METHODS:
            p.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    if args.drift_steps < 1:
        p.error("--drift-steps must be >= 1")
    if args.dry_run and not args.gpu_check:
        p.error("--dry-run goes with --gpu-check")
    if args.ablate is not None and args.out is None:
        args.out = "runs/ablation.json"
    if args.out is None:
        args.out = "runs/precision.json" if args.precision else "runs/bench.json"
    if args.threads is None:
        args.threads = 1 if args.precision else 2
    return args


def default_repeats(shape, device):
    if device == "cuda":
        return 10
    return 10 if shape == "tiny" else 3


def with_default_repeats(shape, args):
    if args.repeats is not None:
        return args
    return argparse.Namespace(**{**vars(args), "repeats": default_repeats(shape, args.device)})


def _worker_entry(fn, fn_args, conn):
    """Body of a worker process: send back fn's result, or the traceback."""
    try:
        conn.send(("ok", fn(*fn_args)))
    except BaseException:  # noqa: BLE001 -- reported to the parent, which stops the run
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def run_isolated(fn, *fn_args):
    """fn(*fn_args) in a fresh process; the last argument is the settings. CPU: fork a parent that has
    imported torch and transformers but run nothing (saves their import in every worker). CUDA: spawn, as
    CUDA cannot be used in a forked child."""
    ctx = mp.get_context("spawn" if fn_args[-1].device == "cuda" else "fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker_entry, args=(fn, fn_args, send))
    proc.start()
    send.close()
    try:
        status, payload = recv.recv()
    except EOFError:
        status, payload = "error", f"the worker died (exit code {proc.join() or proc.exitcode})"
    proc.join()
    if status != "ok":
        sys.exit(f"{fn.__name__}{fn_args[:-1]} failed:\n{payload}")
    return payload


def benchmark(args, shapes, dtypes, methods, memory_methods):
    """Per dtype and shape: one process that times every method in rounds, one per method for memory."""
    timing, memory = [], []
    for dtype in dtypes:
        settings = argparse.Namespace(**{**vars(args), "dtype": dtype})
        for shape in shapes:
            t0 = time.perf_counter()
            timing.append(run_isolated(timing_worker, shape, methods, settings))
            print(f"  {shape} {dtype}: timed {', '.join(methods)} in {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr, flush=True)
            for method in memory_methods:
                memory.append(run_isolated(memory_worker, shape, method, settings))
                print(f"  {shape} {dtype} {method}: extra {_mb(memory[-1]['extra_bytes'])} MB",
                      file=sys.stderr, flush=True)
    return timing, memory


def report(args, timing, memory, started, load_before, precision_rows=None):
    """Print the table and the ratios, and write every number to args.out."""
    load_after = os.getloadavg()
    info = machine(args)
    lines = [line for t in timing for line in ratios(t, memory)]
    peak_note = ("CUDA max_memory_allocated" if args.device == "cuda" else
                 "peak RSS (VmHWM) of the worker process")
    print(f"\nbatch {args.batch} x seq {args.seq}, {args.device}, torch {info['torch']}, "
          f"{info['threads']} threads on {info['cpu_count']} cores ({info.get('gpu', info['cpu'])}); "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
          f"{time.perf_counter() - started:.0f} s in all")
    print(f"times: medians of {timing[0]['repeats']} rounds in which every method takes one step on the same "
          f"model in one process; DiZO = median ordinary step + one timed projection phase / κ. peak MB = "
          f"{peak_note} in a process per method; extra MB = peak - memory after building the model and the "
          f"batches and one forward pass (the method's own memory)\n")
    print(table(timing, memory))
    print()
    for line in lines:
        print("- " + line)
    if precision_rows:
        print("\n" + precision_tables(precision_rows))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "machine": info, "load_average_before": load_before,
                   "load_average_after": load_after, "timing": timing, "memory": memory, "ratios": lines,
                   "precision": precision_rows}, f, indent=1)
    print(f"\nwrote {args.out}")


GPU_METHODS = ("inference", "mezo", "zosgd", "rademacher", "dizo", "dizo-host")
GPU_MEMORY = ("inference", "mezo", "zosgd", "dizo", "dizo-host", "fo")


def gpu_check(args):
    """Every GPU figure of the README's step-time, memory and precision tables, in one run of at most
    8 minutes on an H100: on the OPT-1.3B shape, every ZO method's step time in bf16 (the default exact
    master), fp32 weights with bf16 autocast, fp16 (exact) and fp32, in interleaved rounds; each method's
    peak memory in bf16 (DiZO with its anchors on the GPU and on the host); then the
    precision study (fp32; bf16 and fp16 plain, exact, autocast). --dry-run does the same on the CPU with
    the tiny shape and a few steps, to show that it runs."""
    if args.dry_run:
        args.device, args.repeats, args.drift_steps = "cpu", args.repeats or 2, 2
    elif not torch.cuda.is_available():
        sys.exit("--gpu-check needs a GPU (torch.cuda.is_available() is False); --dry-run runs it on the CPU")
    else:
        args.device = "cuda"
    shape = "tiny" if args.dry_run else "opt-1.3b"
    started, load_before = time.perf_counter(), os.getloadavg()
    timing, memory = benchmark(args, [shape], ["bf16"], GPU_METHODS, GPU_MEMORY)
    timing += benchmark(args, [shape], ["bf16-autocast", "fp16", "fp32"], GPU_METHODS, ())[0]
    precision_rows = run_isolated(precision_study, half_precisions(("bf16", "fp16")), args)
    report(args, timing, memory, started, load_before, precision_rows)


def main(argv=None):
    args = parse_args(argv)
    if args.study is not None:
        return study(args.study, args.target, args.plot)
    if args.replot is not None:
        return replot(Path(args.replot))
    if args.gpu_check:
        return gpu_check(args)
    if args.ablate is not None:
        return ablate_main(args)
    if args.precision:
        halves = ("bf16", "fp16") if args.device == "cuda" else ("bf16",)  # CPU fp16 matmuls: slow or missing
        return precision_main(args, half_precisions(halves))
    if args.device == "cpu":
        import transformers  # noqa: F401 -- imported once here, inherited by the forked workers
    started, load_before = time.perf_counter(), os.getloadavg()
    methods = args.methods.split(",")
    timing, memory = benchmark(args, args.shapes.split(","), [args.dtype], methods, methods)
    report(args, timing, memory, started, load_before)


# ------------------------------------------------------------------------------------------------- ablation
#
# Where a fine-tuning lives: the dev loss and accuracy of a fine-tuned model with one group of parameters put
# back to its pretrained value, and along θ0 + r·Δ for the matrices DiZO projects. If reverting K and V costs
# little, no projection of K and V (whatever its γ) can change much on that task.

ABLATION_RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)  # r of θ0 + r·Δ; DiZO's ratios stay in [1-τ, 1+τ]
ABLATION_LINES = {"K+V": ("k", "v"), "K": ("k",), "V": ("v",)}  # the projected matrices, together and apart
# --ablate reads the task and the dev split as train.py does, with train.py's own flags
ABLATION_DATA_FLAGS = ("task", "data_dir", "k", "num_train", "num_dev", "num_test", "data_seed", "template",
                       "label_words", "trust_remote_code")

Named = list[tuple[str, torch.Tensor]]


def _base_id(t):
    return id(t if t._base is None else t._base)


def _is_norm(module):
    """LayerNorm, RMSNorm and their per-model copies (LlamaRMSNorm): a module whose own parameters are a vector
    `weight` (the scale) and maybe a vector `bias` (the shift)."""
    own = dict(module.named_parameters(recurse=False))
    return set(own) in ({"weight"}, {"weight", "bias"}) and all(p.dim() == 1 for p in own.values())


def _transformer_layers(model, queries):
    """The blocks of the model's layer stacks (children of an nn.ModuleList) that hold a query matrix."""
    return [layer for stack in model.modules() if isinstance(stack, torch.nn.ModuleList) for layer in stack
            if {id(p) for p in layer.parameters()} & queries]


def _attention_module(layer, queries, outputs):
    """The smallest submodule of a transformer layer that holds both its query and its output matrix."""
    holders = [m for m in layer.modules()
               if {id(p) for p in m.parameters()} & queries and {id(p) for p in m.parameters()} & outputs]
    return min(holders, key=lambda m: sum(1 for _ in m.parameters()))


def parameter_groups(model: torch.nn.Module) -> dict[str, Named]:
    """Every parameter of a transformer LM in exactly one group, found by module structure, as (name, tensor):

        embeddings/head   model.get_input_embeddings() and get_output_embeddings() (one tensor when tied)
        q, k, v, o        the attention matrices, as projected_params finds them (views of a fused weight)
        norms             LayerNorm / RMSNorm modules (see _is_norm), anywhere in the model
        attention biases  the rest of each attention block
        mlp               the rest of each transformer layer
        other             the rest of the model (learned positions, projections outside the layers)
    Empty groups are left out. A fused Q|K|V weight is covered by its three views, not listed itself.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    groups, taken = {}, set()

    def add(group, pairs):
        fresh = [(n, t) for n, t in pairs if id(t) not in taken]
        taken.update(id(t) for _, t in fresh)
        taken.update(_base_id(t) for _, t in fresh)
        if fresh:
            groups.setdefault(group, []).extend(fresh)

    def parameters(module):
        return [(names[id(p)], p) for p in module.parameters()]

    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            add("embeddings/head", parameters(module))
    for role in ("q", "k", "v", "o"):
        add(role, projected_params(model, roles=(role,)))
    add("norms", [pair for m in model.modules() if _is_norm(m) for pair in parameters(m)])
    queries = {_base_id(t) for _, t in groups["q"]}
    outputs = {_base_id(t) for _, t in groups["o"]}
    layers = _transformer_layers(model, queries)
    attention = [_attention_module(layer, queries, outputs) for layer in layers]
    add("attention biases", [pair for module in attention for pair in parameters(module)])
    add("mlp", [pair for layer in layers for pair in parameters(layer)])
    add("other", parameters(model))
    return groups


def matched_groups(finetuned, pretrained) -> dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """{group: (fine-tuned tensors, their pretrained counterparts)}; DataError if the two models differ in
    architecture (another parameter name or shape)."""
    ours, theirs = parameter_groups(finetuned), parameter_groups(pretrained)
    shapes = [{g: [(n, tuple(t.shape)) for n, t in pairs] for g, pairs in groups.items()} for groups in (ours, theirs)]
    if shapes[0] != shapes[1]:
        raise data.DataError("the fine-tuned and the pretrained model have different parameters (names or shapes): "
                             "--base must be the model the fine-tuning started from")
    return {g: ([t for _, t in ours[g]], [t for _, t in theirs[g]]) for g in ours}


@torch.no_grad()
def _copy_all_(tensors, values):
    for t, v in zip(tensors, values):
        t.copy_(v)


def measured_with(tensors, values, measure):
    """measure() while `tensors` hold `values` (copied in place); the tensors' own values are put back after,
    bit for bit, whatever measure() does."""
    saved = [t.detach().clone() for t in tensors]
    try:
        _copy_all_(tensors, values)
        return measure()
    finally:
        _copy_all_(tensors, saved)


@torch.no_grad()
def split_metrics(model, loss_fn, enc, batch_size=data.EVAL_BATCH):
    """The prompt loss (mean cross-entropy over the candidates, as PromptLoss.loss) and the accuracy of the
    model on an encoded split, from one forward pass per batch."""
    total, correct = 0.0, 0
    for start in range(0, len(enc.labels), batch_size):
        idx = range(start, min(start + batch_size, len(enc.labels)))
        scores = loss_fn.scores(model, [enc.prompts[i] for i in idx])
        labels = torch.tensor([enc.labels[i] for i in idx], device=scores.device)
        total += float(F.cross_entropy(scores, labels, reduction="sum"))
        correct += int((scores.argmax(1) == labels).sum())
    return {"loss": total / len(enc.labels), "acc": correct / len(enc.labels)}


def interpolated(starts, ends, r):
    """θ0 + r (θ - θ0) per tensor, by torch.lerp as DiZO writes its projections: r = 0 and r = 1 give θ0 and θ
    exactly."""
    return [torch.lerp(a, b, r) for a, b in zip(starts, ends)]


def gain_lost(loss, finetuned, pretrained):
    """Share of the fine-tuning's loss gain that a change gives back: (loss - loss_ft) / (loss_pre - loss_ft);
    None when the fine-tuning gained nothing."""
    gain = pretrained - finetuned
    return (loss - finetuned) / gain if gain > 0 else None


def ablation(finetuned, pretrained, measure) -> dict:
    """The fine-tuned and the pretrained model measured (measure(model) -> {"loss", "acc"}), the fine-tuned
    one with each group alone reverted to pretrained, and along θ0 + r·Δ for K and V, together and apart.
    The fine-tuned model is left as it was."""
    pairs = matched_groups(finetuned, pretrained)
    ft, pre = measure(finetuned), measure(pretrained)
    groups = {}
    for name, (tensors, values) in pairs.items():
        m = measured_with(tensors, values, lambda: measure(finetuned))
        groups[name] = m | {"params": sum(t.numel() for t in tensors),
                            "share_lost": gain_lost(m["loss"], ft["loss"], pre["loss"])}
    lines = {}
    for line, roles in ABLATION_LINES.items():
        tensors = [t for role in roles for t in pairs[role][0]]
        starts = [t for role in roles for t in pairs[role][1]]
        lines[line] = [measured_with(tensors, interpolated(starts, tensors, r), lambda: measure(finetuned))
                       for r in ABLATION_RATIOS]
    kv_reverted = lines["K+V"][ABLATION_RATIOS.index(0.0)]
    return {"finetuned": ft, "pretrained": pre, "groups": groups, "ratios": list(ABLATION_RATIOS),
            "lines": lines, "kv_share_lost": gain_lost(kv_reverted["loss"], ft["loss"], pre["loss"])}


def ablation_tables(result):
    """Markdown: dev loss and accuracy per reverted group; dev loss along θ0 + r·Δ."""
    ft, pre = result["finetuned"], result["pretrained"]
    out = ["| model | params | dev loss | dev acc | share of the loss gain lost |", "|---|---:|---:|---:|---:|",
           f"| fine-tuned | | {ft['loss']:.4f} | {ft['acc']:.3f} | 0 |",
           f"| pretrained | | {pre['loss']:.4f} | {pre['acc']:.3f} | 1 |"]
    for name, g in result["groups"].items():
        lost = "-" if g["share_lost"] is None else f"{g['share_lost']:.3f}"
        out.append(f"| {name} reverted | {g['params']:,} | {g['loss']:.4f} | {g['acc']:.3f} | {lost} |")
    lines = result["lines"]
    out += ["", "dev loss with the projected matrices at θ0 + r·Δ (r = 1: fine-tuned, r = 0: reverted)\n",
            "| r | " + " | ".join(lines) + " |", "|---:|" + "---:|" * len(lines)]
    for i, r in enumerate(result["ratios"]):
        out.append(f"| {r:g} | " + " | ".join(f"{ms[i]['loss']:.4f}" for ms in lines.values()) + " |")
    share = result["kv_share_lost"]
    out.append("\nshare of the fine-tuning's dev-loss gain lost when K and V are reverted: "
               + ("- (the fine-tuning did not lower the dev loss)" if share is None else f"{share:.3f}"))
    return "\n".join(out)


def plot_ablation(result, path):
    """Dev loss per reverted group against the fine-tuned and pretrained losses; dev loss along θ0 + r·Δ."""
    fig, (ax_groups, ax_lines) = pyplot().subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    names = list(result["groups"])
    ax_groups.bar(range(len(names)), [result["groups"][n]["loss"] for n in names], color="tab:blue")
    for key, label, style in (("finetuned", "fine-tuned", "-"), ("pretrained", "pretrained", "--")):
        ax_groups.axhline(result[key]["loss"], color="gray", ls=style, lw=1, label=label)
    ax_groups.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax_groups.set(ylabel="dev loss", title="one group reverted to pretrained")
    ax_groups.legend(fontsize=8)
    for line, ms in result["lines"].items():
        ax_lines.plot(result["ratios"], [m["loss"] for m in ms], marker="o", label=line)
    ax_lines.axvline(1.0, color="gray", lw=0.8)
    ax_lines.set(xlabel="r", ylabel="dev loss", title="projected matrices at θ0 + r·Δ")
    for ax in (ax_groups, ax_lines):
        ax.grid(alpha=0.3)
    ax_lines.legend(fontsize=8)
    save_figure(fig, Path(path))


def add_ablation_flags(p):
    """--ablate and --base, and the data flags of train.py (its Config's fields, same names, same help)."""
    import train

    p.add_argument("--ablate", metavar="FOLDER", default=None,
                   help="instead of benchmarking, revert one parameter group at a time of this fine-tuned model "
                        "folder (train.py --save) and report the dev loss and accuracy")
    p.add_argument("--base", default=train.BUILTIN,
                   help="--ablate: the pretrained model it started from ('builtin' = the embedded tiny OPT)")
    from dataclasses import fields

    config_fields = {f.name: f for f in fields(train.Config)}
    for name in ABLATION_DATA_FLAGS:
        f = config_fields[name]
        if f.default is False:
            p.add_argument(f"--{name}", action="store_true", help=f"--ablate: {f.metadata['help']}")
        else:
            p.add_argument(f"--{name}", default=f.default, type=f.metadata["type"] or type(f.default),
                           help=f"--ablate: {f.metadata['help']}")


def ablate_main(args):
    """--ablate: load both models and the dev split as train.py does, measure, print, write JSON and a figure."""
    import train

    cfg = train.Config(model=args.ablate, method="fo", dtype=args.dtype,  # fo: no DiZO check, ours comes below
                       **{name: getattr(args, name) for name in ABLATION_DATA_FLAGS})
    try:
        train.check_config(cfg)
        setup = train.prepare(cfg)
        base = data.builtin_model() if args.base == train.BUILTIN else args.base
        if data.load_tokenizer(base, cfg.trust_remote_code).get_vocab() != setup.tokenizer.get_vocab():
            raise data.DataError(f"--base {args.base}: its tokenizer differs from the fine-tuned model's; "
                                 "give the model the fine-tuning started from")
        models = [data.load_model(name, setup.kind, DTYPES[args.dtype], setup.device, cfg.trust_remote_code)
                  for name in (setup.name, base)]
        result = ablation(*models, lambda m: split_metrics(m, setup.loss_fn, setup.splits["dev"]))
    except (train.UsageError, data.DataError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"\n{args.ablate} against {args.base}, task {setup.loss_fn.task.name}, "
          f"{len(setup.splits['dev'].labels)} dev examples, {args.dtype}\n")
    print(ablation_tables(result))
    report = {"finetuned_model": args.ablate, "base": args.base, "task": setup.loss_fn.task.name,
              "dev_examples": len(setup.splits["dev"].labels), **result}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    plot_ablation(result, Path(args.out).with_suffix(".png"))
    print(f"\nwrote {args.out} and {Path(args.out).with_suffix('.png')}")


if __name__ == "__main__":
    main()
