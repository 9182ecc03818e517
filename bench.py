"""Measurement of a training step: its time and memory per method, and the precision of ZO steps in half dtypes.

Methods: inference (one forward), a MeZO-style reference step, ZOSGD, DiZO and FO (AdamW).

    python bench.py                            # CPU fp32, tiny, opt-125m, roberta-base: ~7 min on 2 idle cores
    python bench.py --device cuda --dtype bf16 --shapes opt-1.3b --repeats 5
    python bench.py --precision                # ZO with fp32 / half weights / half autocast: ~30 s on 1 core
    python bench.py --gpu-check                # the GPU measurements in one run (--dry-run: tiny shape, CPU)

Models are randomly initialised from a config; the loss is next-token (OPT) or masked-LM (RoBERTa, 15% of positions)
cross-entropy on a random batch. Time: median s/step over --repeats rounds in which every method takes one step on one
model in one process (CUDA synchronised around each step); DiZO: median ordinary step + one timed projection phase
(2M + 2 forward passes) / κ. Memory: a fresh process per method; CPU: peak RSS (VmHWM) reset after building the model
and one forward, extra = peak - RSS then, tracked = peak of the method's own tensors; CUDA: max_memory_allocated.
--precision (fp32; bf16 and fp16, "plain": weights stored, stepped in place and computed in it; "autocast":
fp32 weights, forward under torch.autocast; weight std 0.02 and 0.05): drift of T ZO steps at lr 0 on the tiny OPT,
their g against fp32's; one step with g = 10: the change applied against -ηgz, (θ+ - θ-)/2 against εz."""

import argparse
import collections
import contextlib
import copy
import functools
import json
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
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import runs
import train
from dizo import DiZO, ZOSGD, projected_params

# Random-init model shapes: OPTConfig's defaults are facebook/opt-125m's; roberta-base's differ from RobertaConfig's
SHAPES = {"tiny": ("opt", dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, ffn_dim=512,
                               vocab_size=600, word_embed_proj_dim=128, max_position_embeddings=512)),
          "opt-125m": ("opt", dict()),
          "roberta-base": ("roberta", dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                                           layer_norm_eps=1e-5)),
          "opt-1.3b": ("opt", dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192,
                                   word_embed_proj_dim=2048))}
METHODS = ("inference", "mezo", "zosgd", "rademacher", "dizo", "dizo-host", "fo")
LABELS = {"inference": "inference (one forward)", "mezo": "MeZO-style", "zosgd": "ZOSGD (Gaussian z)",
          "rademacher": "ZOSGD (Rademacher z)", "dizo": "DiZO (amortised)",
          "dizo-host": "DiZO, anchors on the host (amortised)", "fo": "FO (AdamW)"}
DIZO = ("dizo", "dizo-host")  # anchors beside the matrices; in host memory (anchor_device="cpu")
GPU_METHODS = ("inference", "mezo", "zosgd", "rademacher", "dizo", "dizo-host")  # --gpu-check: timed
GPU_MEMORY = ("inference", "mezo", "zosgd", "dizo", "dizo-host", "fo")  # --gpu-check: memory, in bf16
AUTOCAST = {"bf16-autocast": torch.bfloat16}  # fp32 weights, the forward under torch.autocast(dtype)
LR_ZO, EPS_ZO, LR_FO = 1e-6, 1e-3, 1e-5  # MeZO's OPT defaults; the values do not change the cost
MASK_FRACTION = 0.15  # masked-LM loss: share of positions masked (BERT's choice)
HALF_WARNING = r".*weights are stepped in place"  # ZOSGD's warning: measured on purpose


# ---------------------------------------------------------------------------------------------- model, data
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
    return {"input_ids": ids.to(model.device), "labels": labels.to(model.device)}


def loss_fn(model, batch, autocast=None):
    """Cross-entropy of the logits against the labels, under torch.autocast(autocast) unless None, without its cast
    cache as data.PromptLoss; flatten is a view, the upcast a no-op in fp32."""
    with torch.autocast(model.device.type, dtype=autocast, enabled=autocast is not None, cache_enabled=False):
        logits = model(input_ids=batch["input_ids"]).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100)


def setup(shape, args):
    """Device, model, batch and M search batches, after one forward (its thread pools and caches serve every method)."""
    from transformers import OPTConfig, OPTForCausalLM, RobertaConfig, RobertaForMaskedLM
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=HALF_WARNING)
    device, (family, overrides) = torch.device(args.device), SHAPES[shape]
    torch.manual_seed(0)
    config, lm = (OPTConfig, OPTForCausalLM) if family == "opt" else (RobertaConfig, RobertaForMaskedLM)
    with device:  # initialise on the device: a 1.3B fp32 init on the CPU takes minutes
        model = lm(config(**overrides)).to(train.DTYPES.get(args.dtype, torch.float32))
    model.eval().requires_grad_(True)  # eval: no dropout, as MeZO's and DiZO's code
    gen = torch.Generator().manual_seed(1)  # the batch, then DiZO's M search batches
    batch, *fresh = [make_batch(model, args.batch, args.seq, gen) for _ in range(args.proj_iters + 1)]
    with torch.no_grad():
        float(loss_fn(model, batch))
    return device, model, batch, fresh


class MeZOStyle:
    """The baseline: a ZO-SGD step as the released MeZO code writes it. z is drawn four times per step (+ε,
    -2ε, +ε to restore, then the update) from the GLOBAL RNG re-seeded before each pass, one torch.normal per
    tensor, and every pass writes `p.data = p.data + ...`, a new tensor per parameter. No weight decay."""

    def __init__(self, params, lr, eps, seed=0):
        self.params, self.lr, self.eps = [p for p in params if p.requires_grad], lr, eps
        self.seeds = random.Random(seed)

    def _zs(self, seed):
        torch.manual_seed(seed)
        for p in self.params:
            yield p, torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)

    @torch.no_grad()
    def step(self, closure):
        seed, losses = self.seeds.randrange(10 ** 9), []
        for scaling_factor in (1, -2, 1):
            for p, z in self._zs(seed):
                p.data = p.data + scaling_factor * z * self.eps
            if len(losses) < 2:
                losses.append(closure())
        grad = (float(losses[0]) - float(losses[1])) / (2 * self.eps)
        for p, z in self._zs(seed):
            p.data = p.data - self.lr * (grad * z)
        return losses[0]


class TrackedTensors(TorchDispatchMode):
    """Bytes (now, peak) of CPU tensor storage allocated under it and still referenced: a method's own tensors.
    Unseen: storage freed inside one op or held by autograd alone (FO's activations); ZO's is all seen."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0  # live: storage address -> [bytes, tensors referencing it]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in (t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.device.type == "cpu"):
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


# ------------------------------------------------------------------------------------------------- timing
def time_steps(step, warmup, repeats, device):
    """Seconds of each of `repeats` calls of step(), after `warmup` untimed calls (CUDA synchronised)."""
    sync, times = torch.cuda.synchronize if device.type == "cuda" else lambda: None, []
    for i in range(warmup + repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def make_step(method, model, batch, fresh, args):
    """(step function, optimizer): one forward for "inference", else one training step (DiZO's without a phase)."""
    loss = functools.partial(loss_fn, model, autocast=AUTOCAST.get(args.dtype))  # loss(batch)
    if method == "inference":
        return torch.no_grad()(lambda: float(loss(batch))), None
    if method == "fo":
        opt = torch.optim.AdamW(model.parameters(), lr=LR_FO)

        def fo_step():
            opt.zero_grad(set_to_none=True)
            loss(batch).backward()
            opt.step()
        return fo_step, opt
    if method == "mezo":
        opt = MeZOStyle(model.parameters(), lr=LR_ZO, eps=EPS_ZO)
    elif method in ("zosgd", "rademacher"):
        opt = ZOSGD(model.parameters(), lr=LR_ZO, eps=EPS_ZO, direction="gaussian" if method == "zosgd" else method)
    else:
        if args.warmup + args.repeats >= args.kappa:
            raise ValueError("warmup + repeats must be < kappa: DiZO's ordinary steps are timed without a phase")
        opt = DiZO(model.parameters(), projected_params(model), lr=LR_ZO, eps=EPS_ZO, interval=args.kappa,
                   proj_iters=args.proj_iters, search_data=fresh, search_loss=loss,
                   anchor_device="cpu" if method == "dizo-host" else None)
    return (lambda: opt.step(lambda: loss(batch))), opt


def dizo_phase(opt, device):
    """Seconds of one DiZO projection phase (step() runs one every κ steps), and the projected matrices' size."""
    sizes = [t.numel() * t.element_size() for t in opt.matrices]
    return {"phase_s": time_steps(lambda: opt.project(opt._search_closure), 0, 1, device)[0],
            "matrices": len(sizes), "params": sum(t.numel() for t in opt.matrices), "anchor_bytes": sum(sizes),
            "largest_matrix_bytes": max(sizes)}


def timing_worker(shape, methods, args):
    """Every method's step on one model in one process, in rounds of one step each (after --warmup rounds):
    load on the machine hits every method alike, so their ratios hold. DiZO's phase is timed after the rounds."""
    if args.repeats is None:
        args = argparse.Namespace(**{**vars(args), "repeats": 10 if args.device == "cuda" or shape == "tiny" else 3})
    device, model, batch, fresh = setup(shape, args)
    # MeZO-style reallocates every parameter: on its own copy (on a shared model ZOSGD's step took 1.7x as long)
    steps = {m: make_step(m, copy.deepcopy(model) if m == "mezo" else model, batch, fresh, args) for m in methods}
    times = {m: [] for m in methods}
    for i in range(args.warmup + args.repeats):
        for m, (step, _) in steps.items():
            times[m] += time_steps(step, 0, 1, device)[i < args.warmup:]
    out = {"shape": shape, "dtype": args.dtype, "device": args.device, "threads": args.threads, "repeats": args.repeats,
           "warmup": args.warmup, "times_s": times, "median_s": {m: statistics.median(t) for m, t in times.items()}}
    for m in (m for m in DIZO if m in steps):
        out[m] = {"kappa": args.kappa, "proj_iters": args.proj_iters, **dizo_phase(steps[m][1], device)}
        out[m]["amortised_s"] = out["median_s"][m] + out[m]["phase_s"] / args.kappa  # seconds per step over κ
    return out


def memory_worker(shape, method, args):
    """Peak memory of --warmup + 1 steps of one method (and a DiZO phase) from the peak's reset after setup."""
    args = argparse.Namespace(**{**vars(args), "repeats": 1})
    device, model, batch, fresh = setup(shape, args)
    sizes = [p.numel() * p.element_size() for p in model.parameters()]
    mem, tracked, info = runs.PeakMemory(device), TrackedTensors(), {}
    mem.reset()
    with tracked if device.type == "cpu" else contextlib.nullcontext():
        step, opt = make_step(method, model, batch, fresh, args)
        time_steps(step, args.warmup, 1, device)
        if method in DIZO:
            info = dizo_phase(opt, device)
    peak = mem.peak()
    if device.type == "cpu" and method != "fo":  # FO's saved activations are held by autograd, unseen
        info["tracked_peak_bytes"] = tracked.peak
    return {"shape": shape, "method": method, "dtype": args.dtype, "peak_bytes": peak,
            "baseline_bytes": mem.baseline, "extra_bytes": peak - mem.baseline, "hwm_reset": mem.hwm_reset,
            "n_params": sum(p.numel() for p in model.parameters()), "param_bytes": sum(sizes),
            "largest_tensor_bytes": max(sizes), **info}


# ------------------------------------------------------------------------------------------------ report
def _mb(n):
    return f"{n / 2**20:,.0f}"


def ratios(t, memory):
    """Beyond the table: DiZO's time against ZOSGD's plus its phases' forwards; memory beyond ZOSGD's."""
    med, out, tag = t["median_s"], [], f"[{t['shape']} {t['dtype']}]"
    for m in (m for m in DIZO if m in med and "zosgd" in med and "inference" in med):
        d, passes = t[m], 2 * t[m]["proj_iters"] + 2  # the phase's 2M + 2 forward passes
        extra = passes / d["kappa"] * med["inference"]
        out.append(f"{tag} {LABELS[m]} {d['amortised_s']:.4g} s (ordinary step {med[m]:.4g} s + phase "
                   f"{d['phase_s']:.4g} s = {d['phase_s'] / (passes * med['inference']):.2f} x its 2M+2 forwards, "
                   f"/ κ={d['kappa']}, M={d['proj_iters']}) / (ZOSGD {med['zosgd']:.4g} s + (2M+2)/κ forwards "
                   f"{extra:.4g} s) = {d['amortised_s'] / (med['zosgd'] + extra):.3f}")
    mem = {r["method"]: r for r in memory if (r["shape"], r["dtype"]) == (t["shape"], t["dtype"])}
    key, kind = ("extra_bytes", "allocator") if t["device"] == "cuda" else ("tracked_peak_bytes", "tracked tensors")
    if "zosgd" in mem and "inference" in mem:
        out.append(f"{tag} memory ({kind}) ZO - inference = {_mb(mem['zosgd'][key] - mem['inference'][key])} MB; "
                   f"largest tensor {_mb(mem['zosgd']['largest_tensor_bytes'])} MB")
    for m in (m for m in DIZO if m in mem and "zosgd" in mem):
        dz, diff = mem[m], mem[m][key] - mem["zosgd"][key]
        out.append(f"{tag} memory ({kind}) {m} - ZO = {_mb(diff)} MB = {diff / dz['anchor_bytes']:.2f} x anchor "
                   f"({_mb(dz['anchor_bytes'])} MB: {dz['matrices']} matrices, {dz['params'] / 1e6:.2f}M params) = "
                   f"{diff / dz['largest_matrix_bytes']:.2f} x the largest projected matrix")
    if "fo" in mem and "zosgd" in mem:
        out.append(f"{tag} peak memory FO / ZO = {mem['fo']['peak_bytes'] / mem['zosgd']['peak_bytes']:.2f}")
    return out


def machine(args):
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
            "cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine()}
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    return info | ({"gpu": torch.cuda.get_device_name(0)} if args.device == "cuda" else {})


def write_json(path, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    runs.write_json(Path(path), obj)  # atomically; a link at `path` is replaced, never written through
    print(f"\nwrote {path}")


def check_output(path):
    """Refuse, before any work, an output that would replace a train.py run's file or cannot be written: by its name,
    or by where it leads (a symbolic link into a run)."""
    path = Path(path).absolute()
    named, resolved = (path, *path.parents), (path.resolve(), *path.resolve().parents)
    for p in (p for p in (*named, *resolved) if p.name in runs.OUTPUTS):  # a run's output, or inside one
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if json.loads((p.parent / "results.json").read_text()).get("format") == runs.FORMAT:
                sys.exit(f"error: {path} would replace a file of the train.py run in {p.parent}; choose another --out")
    folder = next(p for p in path.parents if p.exists())
    if not folder.is_dir() or not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        sys.exit(f"error: cannot write {path}; choose another --out")


# ------------------------------------------------------------------------------------- precision study
PRECISION_SCALES = (0.02, 0.05)  # typical std of an LLM's weight matrices
PRECISION_LRS = (1e-7, 1e-6, 1e-5)  # around MeZO's ZO lr of 1e-6
KNOWN_G = 10.0  # |g| typical of an LLM at the start of fine-tuning
FIDELITY_SHAPES = ((512, 512),) * 4 + ((512,),) * 4  # one layer's worth: 4 matrices, 2 biases, 2 LayerNorm weights
# ZOSGD steps the weights in `storage`; the forward runs under torch.autocast(`autocast`) unless None
Precision = collections.namedtuple("Precision", "name storage autocast", defaults=[None])


def half_precisions(halves):
    """fp32; per half dtype h: "h plain" (h weights stepped in place) and "h autocast" (fp32, forward in h)."""
    modes = [Precision("fp32", torch.float32)]
    for h in halves:
        modes += [Precision(f"{h} plain", train.DTYPES[h]), Precision(f"{h} autocast", torch.float32, train.DTYPES[h])]
    return modes


def flat64(tensors):
    return torch.cat([t.detach().double().flatten() for t in tensors])


def ratio_cosine(actual, wanted):
    """‖actual‖ / ‖wanted‖ and the cosine between them (0 where `actual` is zero)."""
    norm = actual.norm() * wanted.norm()
    return {"ratio": float(actual.norm() / wanted.norm()), "cosine": float(actual @ wanted / norm) if norm > 0 else 0.0}


def step_fidelity(prec, scale, lr, eps, device):
    """One ZO step with g = KNOWN_G (losses ±gε) on a layer's 1.05M parameters (std `scale`, LayerNorm weights 1),
    z replayed from its seed: the change applied (fp64) against -ηgz; (θ+ - θ-)/2 against εz."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter((torch.ones(shape) if i >= 6 else torch.randn(shape, generator=gen) * scale)
                                 .to(device, prec.storage)) for i, shape in enumerate(FIDELITY_SHAPES)]
    before, seen, losses = flat64(params), [], iter((KNOWN_G * eps, -KNOWN_G * eps))

    def closure():
        seen.append(flat64(params))
        return next(losses)
    ZOSGD(params, lr=lr, eps=eps, seed=0).step(closure)
    # z as ZOSGD documents it: its first step seed (drawn from seed 0) seeds a Generator, then torch.randn per tensor
    step_seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(0)))
    z_gen = torch.Generator(device=params[0].device).manual_seed(step_seed)
    z = flat64([torch.randn(p.shape, generator=z_gen, device=p.device, dtype=p.dtype) for p in params])
    return {"update": ratio_cosine(flat64(params) - before, -lr * KNOWN_G * z),
            "perturbation": ratio_cosine((seen[0] - seen[1]) / 2, eps * z)}


def precision_study(precisions, args):
    """Per (precision, scale) on the tiny OPT: T = --drift-steps ZO steps at lr 0, the precisions alternating (relative
    drift ‖θ_T - θ_0‖/‖θ_0‖, max |θ_T - θ_0|, each step's g, the fastest: load only adds time); step_fidelity per lr."""
    device, steps = torch.device(args.device), args.drift_steps
    warnings.filterwarnings("ignore", message=HALF_WARNING)
    from transformers import OPTConfig, OPTForCausalLM
    rows = []
    for scale in PRECISION_SCALES:
        trials = []
        for prec in precisions:  # the tiny OPT initialised with weight std `scale` in fp32, then cast
            torch.manual_seed(0)
            model = OPTForCausalLM(OPTConfig(**SHAPES["tiny"][1], init_std=scale)).to(device, prec.storage).eval()
            batch, params = make_batch(model, 4, 32, torch.Generator().manual_seed(1)), list(model.parameters())
            trials.append(dict(opt=ZOSGD(params, lr=0.0, eps=EPS_ZO, seed=0), params=params, weights0=flat64(params),
                             grads=[], times=[], closure=functools.partial(loss_fn, model, batch, prec.autocast)))
        for _ in range(steps):
            for run in trials:
                run["times"] += time_steps(lambda: run["opt"].step(run["closure"]), 0, 1, device)
                run["grads"].append(run["opt"].projected_grad)
        for prec, run in zip(precisions, trials):
            moved = flat64(run["params"]) - run["weights0"]
            lr0 = {"steps": steps, "drift": float(moved.norm() / run["weights0"].norm()),
                   "max_abs": float(moved.abs().max()), "grads": run["grads"], "step_s": min(run["times"])}
            rows.append({"precision": prec.name, "scale": scale, "eps": EPS_ZO, "lr0": lr0,
                         "bytes_per_param": prec.storage.itemsize,
                         "fidelity": {lr: step_fidelity(prec, scale, lr, EPS_ZO, device) for lr in PRECISION_LRS}})
            print(f"  {prec.name:>14} scale {scale}: lr-0 drift {lr0['drift']:.3g}", file=sys.stderr, flush=True)
    return rows


def precision_tables(rows):
    """Two markdown tables: lr-0 drift, g error, memory and time per (precision, scale); fidelity per lr."""
    def ratio_cos(rc):
        return (f"{rc['ratio']:.3f}×" if rc["ratio"] < 10 else f"{rc['ratio']:.1f}×") + f" ({rc['cosine']:.3f})"
    ref, steps = rows[0]["precision"], rows[0]["lr0"]["steps"]  # the first precision, fp32, is the reference
    refs = {r["scale"]: r["lr0"] for r in rows if r["precision"] == ref}
    out = [f"lr 0, T = {steps} ZO steps on the tiny OPT (ε {rows[0]['eps']:g}): drift = ‖θ_T - θ_0‖/‖θ_0‖; g error "
           f"= ‖g - g_{ref}‖ / ‖g_{ref}‖ over the same seeds; step s: the fastest step\n",
           "| precision | scale | bytes/param | drift after T | drift / step | max abs Δ | g error "
           f"| step s (÷ {ref}) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        d, b = r["lr0"], refs[r["scale"]]
        g, g0 = torch.tensor(d["grads"]), torch.tensor(b["grads"])
        out.append(f"| {r['precision']} | {r['scale']:g} | {r['bytes_per_param']} | {d['drift']:.3g} "
                   f"| {d['drift'] / steps:.3g} | {d['max_abs']:.3g} | {float((g - g0).norm() / g0.norm()):.3g} "
                   f"| {d['step_s']:.4f} ({d['step_s'] / b['step_s']:.2f}) |")
    lrs = list(rows[0]["fidelity"])
    out += [f"\nOne ZO step with g = {KNOWN_G:g}: the perturbation the forward passes see, (θ+ - θ-)/2 of the stored "
            f"weights, against εz; the change applied (fp64) against the intended -ηgz. Ratio of norms (cosine)\n",
            "| precision | scale | perturbation | " + " | ".join(f"update, lr {lr:g}" for lr in lrs) + " |",
            "|---|---:|---:|" + "---:|" * len(lrs)]
    for r in rows:
        f = list(r["fidelity"].values())
        out.append(f"| {r['precision']} | {r['scale']:g} | {ratio_cos(f[0]['perturbation'])} | "
                   + " | ".join(ratio_cos(x["update"]) for x in f) + " |")
    return "\n".join(out)


# ------------------------------------------------------------------------------- command line, processes
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="tiny,opt-125m,roberta-base", help=f"comma-separated, from {', '.join(SHAPES)}")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from " + ", ".join(METHODS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--repeats", type=int,
                   help="timed rounds, one step of every method each (default: 10 for tiny and on CUDA, else 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=tuple(train.DTYPES) + tuple(AUTOCAST), help="the weights' dtype "
                   "(bf16, fp16: stepped in place); bf16-autocast: fp32 weights, forward passes under torch.autocast")
    p.add_argument("--threads", type=int, help="torch threads per worker (default 2; --precision: 1)")
    p.add_argument("--kappa", type=int, default=50, help="DiZO interval κ for the amortisation (released: 50)")
    p.add_argument("--proj-iters", type=int, default=10, help="DiZO M, inner iterations per phase (released: 10)")
    p.add_argument("--out", help="JSON of every row (default runs/bench.json; runs/precision.json with --precision)")
    p.add_argument("--precision", action="store_true", help="instead of timing shapes, the precision study")
    p.add_argument("--drift-steps", type=int, default=20, help="--precision: ZO steps at lr 0 (T)")
    p.add_argument("--gpu-check", action="store_true", help="the GPU measurements in one run (not yet run on a GPU)")
    p.add_argument("--dry-run", action="store_true", help="--gpu-check on the CPU with the tiny shape")
    args = p.parse_args(argv)
    for kind, given, known in (("shape", args.shapes, SHAPES), ("method", args.methods, METHODS)):
        for x in (x for x in given.split(",") if x not in known):
            p.error(f"unknown {kind} {x!r}; choose from {', '.join(known)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    for flag, value in (("--repeats", args.repeats or 1), ("--drift-steps", args.drift_steps)):
        if value < 1:
            p.error(f"{flag} must be >= 1")
    if args.dry_run and not args.gpu_check:
        p.error("--dry-run goes with --gpu-check")
    args.out = args.out or f"runs/{'precision' if args.precision else 'bench'}.json"
    args.threads = args.threads or (1 if args.precision else 2)
    check_output(args.out)  # before the work
    return args


def _worker_entry(fn, fn_args, conn):
    """Body of a worker process: send back fn's result, or the traceback."""
    try:
        conn.send(("ok", fn(*fn_args)))
    except BaseException:  # noqa: BLE001 -- reported to the parent, which stops the run
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def run_isolated(fn, *fn_args):
    """fn(*fn_args) in a fresh process (settings last): forked on the CPU, spawned for CUDA."""
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


def benchmark(args, shapes, dtypes, methods, memory_methods, halves=()):
    """Per dtype and shape: one process that times every method in rounds, and for the first dtype one per method for
    memory; then the precision study with the `halves` dtypes, if any; then the report."""
    started, load_before = time.perf_counter(), os.getloadavg()
    timing, memory = [], []
    for dtype in dtypes:
        settings = argparse.Namespace(**{**vars(args), "dtype": dtype})
        for shape in shapes:
            t0 = time.perf_counter()
            timing.append(run_isolated(timing_worker, shape, methods, settings))
            print(f"  {shape} {dtype}: timed in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            for method in memory_methods if dtype == dtypes[0] else ():
                memory.append(run_isolated(memory_worker, shape, method, settings))
                print(f"  {shape} {dtype} {method}: extra {_mb(memory[-1]['extra_bytes'])} MB", file=sys.stderr)
    precision_rows = run_isolated(precision_study, half_precisions(halves), args) if halves else None
    report(args, timing, memory, started, load_before, precision_rows)


def report(args, timing, memory, started, load_before, precision_rows=None):
    """Print the table (per shape and method: median s/step, its ratios to two forwards and to ZOSGD, its memory) and
    the ratios, and write every number to args.out."""
    load_after, info = os.getloadavg(), machine(args)
    lines = [line for t in timing for line in ratios(t, memory)]
    peak_of = "CUDA max_memory_allocated" if args.device == "cuda" else "peak RSS (VmHWM) of the worker process"
    print(f"\nbatch {args.batch} x seq {args.seq}, {args.device}, torch {info['torch']}, {info['threads']} threads "
          f"on {info['cpu_count']} cores ({info.get('gpu', info['cpu'])}); load average {load_before[0]:.2f} "
          f"before, {load_after[0]:.2f} after; {time.perf_counter() - started:.0f} s in all; medians of "
          f"{timing[0]['repeats']} rounds; peak MB = {peak_of}; extra MB = peak - memory before the first step\n")
    print("| shape | dtype | method | median s/step | ÷ two forwards | ÷ ZOSGD | extra MB | tracked MB | peak MB |\n"
          "|---|---|---|---:|---:|---:|---:|---:|---:|")
    by_run = {(r["shape"], r["dtype"], r["method"]): r for r in memory}
    for t in timing:
        med = {m: t[m]["amortised_s"] if m in DIZO else s for m, s in t["median_s"].items()}
        for m, s in med.items():
            two = f"{s / (2 * med['inference']):.2f}" if "inference" in med else "-"
            zo = f"{s / med['zosgd']:.2f}" if "zosgd" in med else "-"
            r = by_run.get((t["shape"], t["dtype"], m), {})
            extra, tracked, peak = (_mb(r[k]) if k in r else "-"
                                    for k in ("extra_bytes", "tracked_peak_bytes", "peak_bytes"))
            print(f"| {t['shape']} | {t['dtype']} | {LABELS[m]} | {s:.4g} | {two} | {zo} | {extra} | {tracked} "
                  f"| {peak} |")
    print("".join(f"\n- {line}" for line in lines))  # a blank line, then one bullet per ratio
    if precision_rows:
        print("\n" + precision_tables(precision_rows))
    write_json(args.out, {"args": vars(args), "machine": info, "load_average_before": load_before,
                          "load_average_after": load_after, "timing": timing, "memory": memory, "ratios": lines,
                          "precision": precision_rows})


def gpu_check(args):
    """The GPU measurements in one run, OPT-1.3B shape (--dry-run: on the CPU, the tiny shape, a short batch and few
    steps, to show that it runs): step times in each dtype, memory in bf16, the precision study with fp16."""
    if args.dry_run:  # 1 thread: a second one waiting for a busy core slows a small step many times
        args.repeats, args.drift_steps, args.threads = args.repeats or 2, 2, 1
        args.batch, args.seq, args.proj_iters = 2, 16, 2
    elif not torch.cuda.is_available():
        sys.exit("--gpu-check needs a GPU (torch.cuda.is_available() is False); --dry-run runs it on the CPU")
    args.device, shape = ("cpu", "tiny") if args.dry_run else ("cuda", "opt-1.3b")
    benchmark(args, [shape], ["bf16", "bf16-autocast", "fp16", "fp32"], GPU_METHODS, GPU_MEMORY, ("bf16", "fp16"))


def main(argv=None):
    args = parse_args(argv)
    if args.gpu_check:
        return gpu_check(args)
    if args.precision:
        torch.set_num_threads(args.threads)
        rows = precision_study(half_precisions(("bf16", "fp16")), args)
        info = machine(args)
        print(f"\n{args.device}, torch {info['torch']}, {args.threads} threads ({info.get('gpu', info['cpu'])})\n")
        print(precision_tables(rows))
        return write_json(args.out, {"args": vars(args), "machine": info, "rows": rows})
    if args.device == "cpu":
        import transformers  # noqa: F401 -- imported once here, inherited by the forked workers
    methods = args.methods.split(",")
    benchmark(args, args.shapes.split(","), [args.dtype], methods, methods)


if __name__ == "__main__":
    main()
