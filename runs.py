"""The run's folder: everything a run writes and reads back, and what keeps it safe.

    out_dir/results.json            the run's flags, data and model hashes; each method's result and history
    out_dir/checkpoints/<method>/   the last checkpoint, replaced whole (Run.checkpoint): the weights (--lora: the
                                    adapters), the tokenizer, trainer_state.pt (Run.state: the optimizer's state,
                                    DiZO's θ0 in it; the schedule, the data orders, the result so far, the RNGs)
    out_dir/model/ (--save), curves.png, projection.png, divergence.png, .lock (one run at a time)

At each evaluation the loop writes a history entry, then the checkpoint, then results.json. --resume refuses other
flags or world size (check_out_dir), other data or base model (open_folder); then load_checkpoint loads the weights and
Run.restore the rest. Files are written atomically and never through a symbolic link; nothing train.py did not write
is replaced or removed; signals (Stop) end a run at the end of a step, with a checkpoint."""
import contextlib
import datetime
import ctypes
import gc
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm


class RunError(ValueError):
    """A run folder, checkpoint or model folder that cannot be used: printed as one line, nothing written."""


def first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0]}" if str(err).strip() else type(err).__name__


# ------------------------------------------------------------------------------------- the run's folder
# Every write atomic; the folder is one run's at a time (a lock), and nothing train.py did not write is replaced or
# removed: its results.json carries FORMAT, and OUTPUTS are the only names it writes. The one rule for links: a run
# never writes, moves or deletes through a symbolic link. A link where a file or folder is written is replaced by
# the new one (os.replace renames over the link itself) or unlinked (remove); the folders a run writes into are
# made by own_folder, which refuses a link; the lock is opened with O_NOFOLLOW.
FORMAT = "dizo-train/1"
OUTPUTS = ("results.json", "curves.png", "divergence.png", "projection.png", "checkpoints", "model")


def write_atomically(path, write) -> None:
    """write(tmp) creates a file or a folder at a temporary name, then renamed to `path`: a kill leaves the old or
    the new one whole (an old folder is first renamed aside, then removed; `checkpoint_dir` knows that name)."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    remove(tmp)
    try:
        write(tmp)
    except BaseException as e:
        remove(tmp)
        if isinstance(e, RuntimeError) or type(e).__name__ == "SafetensorError":  # torch.save's, safetensors'
            raise OSError(f"cannot write {path} ({first_line(e)[:200]}): is the disk full?") from e
        raise
    if path.is_dir():  # a folder cannot be replaced in one step: aside first
        remove(old)
        os.replace(path, old)
    os.replace(tmp, path)
    remove(old)


def remove(path: Path) -> None:
    """Delete a file or a folder tree, if there is one; a symbolic link is removed, not what it points to."""
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)


def own_folder(out_dir, *names):
    """out_dir/names..., each level a real folder of the run: made if missing, refused if it is a symbolic link."""
    folder = Path(out_dir)
    for name in names:
        folder = folder / name
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise RunError(f"{folder} is a symbolic link or a file; a run writes only its own files, never where a "
                           "link points: remove it, or make --out_dir itself the link")
        folder.mkdir(exist_ok=True)
    return folder


def write_json(path, obj):
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2)))


def save_model(model, tokenizer, folder, state=None):
    """The weights (safetensors; a PEFT model: its adapters), config and tokenizer, as from_pretrained reads them, and
    `state` as trainer_state.pt: written to folder.tmp, which then replaces `folder` (write_atomically)."""
    def write(tmp):
        model.save_pretrained(tmp)  # safetensors
        tokenizer.save_pretrained(tmp)
        if state is not None:
            torch.save(state, tmp / "trainer_state.pt")
    folder.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(folder, write)


def checkpoint_dir(out_dir, method):
    folder = out_dir / "checkpoints" / method
    old = folder.with_name(method + ".old")
    return old if not folder.exists() and old.exists() else folder  # a kill between the two renames


def load_checkpoint(out_dir, method, model):
    """Weights into `model` and the trainer state, from the method's last checkpoint; None if none was reached."""
    from safetensors.torch import load_file
    folder = checkpoint_dir(out_dir, method)
    if not (folder / "trainer_state.pt").exists():
        return None
    try:
        weights = {}
        for path in sorted(folder.glob("*.safetensors")):  # one file, or shards
            weights |= load_file(str(path), device=str(next(model.parameters()).device))
        state = torch.load(folder / "trainer_state.pt", weights_only=True)
    except Exception as e:  # truncated or corrupt files
        raise RunError(f"checkpoint {folder} is damaged ({first_line(e)}); start the run again with --overwrite")
    if hasattr(model, "peft_config"):  # a LoRA checkpoint holds the adapters; the base comes from --model
        from peft import set_peft_model_state_dict
        unexpected, untied = set_peft_model_state_dict(model, weights).unexpected_keys, []
    else:
        missing, unexpected = model.load_state_dict(weights, strict=False)
        # save_pretrained stores a tied tensor once (OPT's lm_head, RoBERTa's decoder): a key may be missing
        # only if it shares its storage with a key that is there.
        tensors = model.state_dict()
        present = {tensors[k].data_ptr() for k in weights if k in tensors}
        untied = [k for k in missing if tensors[k].data_ptr() not in present]
    if unexpected or untied:
        raise RunError(f"checkpoint {folder} does not match the model: {untied[:3]} {unexpected[:3]}")
    return state


HASHES = {"data_hash": "the data differ from the saved run's (were the files changed?)",
          "model_hash": "the model's weights differ from the saved run's (was --model changed or re-saved?)"}
ASIDE = ".overwritten"  # --overwrite moves the old outputs here first, and deletes them once the new run is set


def check_out_dir(out_dir, settings, resume, overwrite, inputs):
    """The results so far in out_dir, checked against a run with these settings (a hash of None, not yet known,
    is not compared) and its `inputs` (paths that must not be inside its outputs)."""
    out_dir, path = Path(out_dir), Path(out_dir) / "results.json"
    saved = None
    if path.exists():
        with contextlib.suppress(OSError, ValueError):
            saved = json.loads(path.read_text())
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            raise RunError(f"{path} was not written by train.py, or is damaged; choose another --out_dir")
    if resume:
        if saved is None:
            raise RunError(f"--resume: no results.json in {out_dir}, nothing to resume")
        if os.path.lexists(out_dir / ASIDE):
            raise RunError(f"--resume: an --overwrite of {out_dir} was interrupted; run it again with --overwrite")
        if links := [n for n in OUTPUTS if (out_dir / n).is_symlink()]:
            raise RunError(f"--resume: {out_dir / links[0]} is a symbolic link; a run writes only its own files, "
                           "never where a link points: remove it, or make --out_dir itself the link")
        if missing := [k for k in settings if k not in HASHES and k not in saved["config"]]:
            raise RunError(f"--resume: {path} was written by an earlier train.py, which did not record "
                           f"{', '.join(missing)}; finish the run with that version, or start again with --overwrite")
        changed = [f"{k} (saved {saved['config'].get(k)!r}, now {v!r})" for k, v in settings.items()
                   if k not in HASHES and saved["config"].get(k) != v]
        if changed:
            raise RunError(f"--resume: flags differ from the saved run: {', '.join(changed)}")
        for key, message in HASHES.items():
            if settings.get(key) and saved["config"].get(key) != settings[key]:
                raise RunError(f"--resume: {message}")
        return saved
    if saved is not None and not overwrite:
        raise RunError(f"{out_dir} already holds a run; pass --overwrite to replace it or --resume to continue it")
    present = [out_dir / n for n in OUTPUTS if os.path.lexists(out_dir / n)]
    if saved is None and present:
        raise RunError(f"{present[0]} exists and was not written by train.py; choose another --out_dir")
    for path in present:
        for given in inputs:
            if given and Path(given).resolve().is_relative_to(path.resolve()):
                raise RunError(f"--overwrite would remove {path}, which holds {given}; choose another --out_dir")
    return {"format": FORMAT, "config": settings, "methods": {}}


def claim_out_dir(out_dir, settings, resume, overwrite, inputs):
    """Create and lock out_dir for this run (another run into it fails at once), check it again under the lock, and
    unless resuming replace the old run. --overwrite moves the old outputs into ASIDE (renames: a symbolic link moves
    as a link), then writes the new results.json, then deletes ASIDE: interrupted at any point, the folder is the old
    run's or the new one's, and --overwrite works again (--resume of an old run half moved aside is refused)."""
    import fcntl
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if (out_dir / ".lock").is_symlink():  # never opened through a link: a user's file it points to is untouched
            (out_dir / ".lock").unlink()
        lock = os.fdopen(os.open(out_dir / ".lock", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644), "w")
    except OSError as e:
        raise RunError(f"--out_dir {out_dir}: cannot write there ({e.strerror})")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise RunError(f"another train.py is running in {out_dir}; wait for it or choose another --out_dir")
    results = check_out_dir(out_dir, settings, resume, overwrite, inputs)
    if not resume:
        aside = out_dir / ASIDE
        if aside.is_symlink() or (aside.exists() and not aside.is_dir()):
            aside.unlink()  # a link's target is not ours to fill or empty
        aside.mkdir(exist_ok=True)
        for name in OUTPUTS[1:]:
            if os.path.lexists(out_dir / name):
                remove(aside / name)  # left by an earlier interrupted --overwrite
                os.replace(out_dir / name, aside / name)
        write_json(out_dir / "results.json", results)  # the folder is this run's from now on: --resume works
        remove(aside)                                   # even if it is killed before its first evaluation
    return results, lock


def check_disk_space(out_dir, need):
    """Refuse to start without `need` bytes (+10%) free in out_dir, rather than fail at a checkpoint."""
    need *= 1.1
    out_dir = Path(out_dir).absolute()
    free = shutil.disk_usage(next(p for p in (out_dir, *out_dir.parents) if p.exists())).free
    if free < need:
        raise RunError(f"--out_dir {out_dir}: {free / 2**20:,.0f} MB free, checkpoints of this model need about "
                        f"{need / 2**20:,.0f} MB")


def disk_needed(cfg, model):
    """Bytes a run writes at most at once: a checkpoint and its replacement (weights, FO's two AdamW moments of
    the trained parameters, up to 16 MB of tokenizer files), and with --save every method's model."""
    weights = sum(p.numel() * max(4, p.element_size()) for p in model.parameters())  # fp32, or the model's fp64
    trained = sum(p.numel() * max(4, p.element_size()) for p in model.parameters() if p.requires_grad)
    checkpoint = weights + (2 * trained if "fo" in cfg.methods else 0) + 2**24
    return 2 * checkpoint + (len(cfg.methods) * weights if cfg.save else 0)


def saved_model_dir(cfg, out_dir, method):
    return out_dir / "model" / method if len(cfg.methods) > 1 else out_dir / "model"


def save_final_model(cfg, out_dir, method, model, tokenizer):
    """--save: the method's final model into out_dir/model/ (model/<method>/ when the run has several methods)."""
    folder = saved_model_dir(cfg, out_dir, method)
    own_folder(out_dir, *folder.relative_to(out_dir).parts[:-1])
    save_model(model, tokenizer, folder)


def save_from_checkpoint(cfg, out_dir, method, model, tokenizer):
    """--save given when resuming a run whose `method` had finished: its model (`model`, freshly loaded) from its
    final checkpoint."""
    if load_checkpoint(out_dir, method, model) is None:
        raise RunError(f"--save: {method} finished without a checkpoint to save it from; run it again")
    save_final_model(cfg, out_dir, method, model, tokenizer)


def model_hash(model):
    """A fingerprint of the pretrained weights (LoRA adapters left out): names, shapes and up to 4096 entries of
    each tensor, so that a resume from a different base model is refused."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if "lora_" not in name:
            sample = p.detach().flatten()[::max(1, p.numel() // 4096)].float().cpu()
            h.update(f"{name}{tuple(p.shape)}".encode() + sample.numpy().tobytes())
    return h.hexdigest()[:16]


class Folder:
    """A claimed run folder: results.json's content, written whole after each change, and the lock that keeps
    another train.py out (None on the ranks other than 0, which write nothing)."""

    def __init__(self, out_dir, results, lock):
        self.out_dir, self.results, self.lock = Path(out_dir), results, lock

    def write(self, method, r):
        self.results["methods"][method] = r | {"world_size": RANKS.world}
        write_json(self.out_dir / "results.json", self.results)

    def close(self):
        if self.lock is not None:
            self.lock.close()


def open_folder(out_dir, settings, resume, overwrite, inputs):
    """Rank 0 claims out_dir (claim_out_dir); the other ranks read the results.json it holds once it has."""
    folder = dict(out_dir=out_dir, settings=settings, resume=resume, overwrite=overwrite, inputs=inputs)
    results, lock = claim_out_dir(**folder) if RANKS.main else (None, None)
    RANKS.barrier()
    results = results if RANKS.main else check_out_dir(**folder | {"resume": True})
    RANKS.barrier()
    return Folder(out_dir, results, lock)


class Run:
    """One method's training as its folder records it: the result (its entry in results.json: history, cost,
    DiZO's phases) and what a checkpoint holds besides the weights (`parts`: optimizer, schedule, data orders;
    the RNG; --track_divergence's W0, `tracked_w0`: not DiZO's θ0, which is in the optimizer's state). The loop
    calls log() and stop_requested() after each step, record() and checkpoint() at each evaluation or stop."""

    def __init__(self, folder, method, model, tokenizer, parts, passes, result, tracked_w0=None, track=None):
        self.folder, self.method, self.model, self.tokenizer = folder, method, model, tokenizer
        self.parts, self.passes, self.r, self.tracked_w0, self.track = parts, passes, result, tracked_w0, track
        self.window, self.bar, self.tic = [], None, time.perf_counter()

    def restore(self, state):
        """Continue from a checkpoint's `state`: the results so far, and the losses of an interval a signal cut."""
        if missing := [k for k in [*self.parts, "result", "tracked_w0", "window"] if k not in state]:
            raise RunError(f"--resume: the checkpoint of {self.method} was written by an earlier train.py, without "
                           f"{', '.join(missing)}; finish the run with that version, or start again with --overwrite")
        for k, part in self.parts.items():  # DiZO's θ0 comes back with the optimizer's state_dict
            part.load_state_dict(state[k])
        self.tracked_w0, self.r = state["tracked_w0"], state["result"]
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.passes.calls = self.r["forward_passes"]
        if state.get("window"):  # stopped between evaluations: that history entry is not a real one
            self.r["history"].pop()
            self.window = state["window"]

    def state(self, window):
        """trainer_state.pt: each part's state_dict (optimizer, schedule, data orders), this result, tracked_w0, the
        losses of an interval a signal cut (`window`), the RNGs."""
        return {k: part.state_dict() for k, part in self.parts.items()} | {
            "result": self.r, "tracked_w0": self.tracked_w0, "window": window, "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}

    @property
    def step(self):
        return self.r["steps"]

    def begin(self, zero_shot_acc, dev):
        """The untrained model's test accuracy, and its dev accuracy and loss as the history's step 0."""
        self.r["zero_shot_acc"] = zero_shot_acc
        self.r["history"].append({"step": 0, "loss": None, "dev_acc": dev[0], "dev_loss": dev[1],
                                  "forward_passes": 0})

    def steps(self, total):
        """The steps still to take, 1-based, under a progress bar (rank 0)."""
        with tqdm(total=total, initial=self.step, desc=self.method, dynamic_ncols=True, disable=not RANKS.main) as bar:
            self.bar, self.tic = bar, time.perf_counter()
            yield from range(self.step + 1, total + 1)

    def log(self, loss, opt):
        """After a step: its training loss, the forward passes and training time so far (DiZO's held-out
        measurements left out), DiZO's phase if one ran."""
        now, held_out_s = time.perf_counter(), getattr(opt, "held_out_s", 0.0)
        self.r["wall_s"] += now - self.tic - held_out_s
        self.tic, opt.held_out_s = now, 0.0
        self.window.append(float(loss))
        self.r["steps"] += 1
        self.r["forward_passes"] = self.passes.calls
        phase = getattr(opt, "last_phase", None)
        if phase and phase["step"] == self.step:
            self.r["projection"].append(phase)
        self.bar.update()
        self.bar.set_postfix({self.r.get("loss_is", "loss"): f"{self.window[-1]:.4f}"})

    def stop_requested(self):
        """Ctrl-C, SIGTERM or SIGHUP reached this process, or another rank (every rank stops at the same step)."""
        return RANKS.agree(Stop.signum is not None)

    def record(self, dev):
        """An evaluation's entry in the history: the mean training loss since the last, dev accuracy and loss
        ((None, None) when a signal cut the interval short), the cost so far and the tracked divergence.
        Non-finite weights are never recorded nor checkpointed."""
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            raise FloatingPointError(f"non-finite weights after step {self.step}")
        entry = {"step": self.step, "loss": sum(self.window) / len(self.window), "dev_acc": dev[0],
                 "dev_loss": dev[1], "forward_passes": self.r["forward_passes"], "wall_s": self.r["wall_s"]}
        if self.track is not None:
            entry["divergence"] = self.track(self.tracked_w0)
        self.r["history"].append(entry)

    def checkpoint(self, cut_short):
        """Rank 0 replaces out_dir/checkpoints/<method>/ (save_model: weights, config, tokenizer; state():
        trainer_state.pt), then writes results.json, which never names a step the checkpoint has not reached. An
        interval cut short by a signal: its losses go with the checkpoint, for a resume to go on with them."""
        window, self.window = (self.window if cut_short else []), []
        if RANKS.main:
            folder = own_folder(self.folder.out_dir, "checkpoints") / self.method
            save_model(self.model, self.tokenizer, folder, self.state(window))
            self.folder.write(self.method, self.r)
        self.tic = time.perf_counter()

    def diverged(self, error):
        note = " ".join([str(error), *getattr(error, "__notes__", [])])  # dizo.py says how θ was put back
        return self.r | {"status": "diverged", "error": note, "forward_passes": self.passes.calls}


# ------------------------------------------------------------------------------- processes, signals, memory
# torchrun's process group. Every rank draws the same global mini-batch (same seed) and evaluates its share,
# idx[rank::world]; one all-reduce of (Σ loss, count) gives every rank the global mean, so ZO's ℓ± (and the γ
# search's), g, z (from the shared seed) and the update are the same everywhere: a ZO step costs one all-reduce
# of two scalars per forward pass, no gradient traffic. FO uses DistributedDataParallel.

class Ranks:
    """This process's place in the run (`world`, `rank`, `main`), its `device`, and the collectives: no-ops in
    a process started without torchrun (a world of one)."""
    device = torch.device("cpu")
    # torchrun's environment (the env:// rendezvous) says where this process stands
    world = property(lambda self: int(os.environ.get("WORLD_SIZE", 1)))
    rank = property(lambda self: int(os.environ.get("RANK", 0)))
    main = property(lambda self: self.rank == 0)

    def start(self):
        """Join the process group (NCCL between GPUs, one per process; gloo on CPUs) and set the device."""
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.world == 1:
            return
        if self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        # a rank that dies leaves the others waiting in an all-reduce: they give up after the timeout
        torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                             timeout=datetime.timedelta(minutes=10))

    def stop(self):
        if self.world > 1:
            torch.distributed.destroy_process_group()

    def shard(self, idx):  # this process's share of a global mini-batch
        return idx[self.rank::self.world]

    def total(self, *values):
        """Σ over ranks of each value (floats), identical on every rank."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return tuple(t.tolist())

    def mean(self, loss, count):
        """The global mean of per-rank mean losses over `count` examples each; a tensor alone is left as is."""
        if self.world == 1:
            return loss
        total, n = self.total(float(loss) * count, count)
        return total / n

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def agree(self, flag):
        """True on every rank if it is true on any (a signal reaches the ranks at different steps)."""
        return flag if self.world == 1 else self.total(float(flag))[0] > 0


RANKS = Ranks()


def report_divergence(out_dir, method, error):
    """A method stopped by a non-finite loss or weight: one line that says where its last good checkpoint is; 1."""
    kept = checkpoint_dir(out_dir, method)
    where = f"the last good checkpoint is in {kept}" if kept.exists() else "no checkpoint was reached"
    print(f"error: {method} diverged: {error}; {where}", file=sys.stderr)
    return 1


def lost_other_ranks(error):
    """Under torchrun a collective fails when another process of the run died: one line, exit code 1. A run of one
    process re-raises the error: it is not that."""
    if RANKS.world == 1:
        raise error
    print(f"error: rank {RANKS.rank} lost the other processes ({first_line(error)[:120]}); the last checkpoint is "
          "kept, continue with --resume", file=sys.stderr)
    return 1


def split_loss(loss_fn, enc, model, idx, micro, backward):
    """train.TrainLoss under torchrun or --grad_accum: the mean loss of the mini-batch `idx` over every rank, from
    this rank's share in `micro` micro-batches, each weighted by its size (with `backward`, backpropagated as it is
    computed: one micro-batch's activations at a time; DDP all-reduces the gradients once, at the last)."""
    mine = RANKS.shard(idx)
    chunks = [mine[i::micro] for i in range(micro) if mine[i::micro]]
    total = 0.0
    for i, chunk in enumerate(chunks):
        loss = loss_fn.loss(model, enc, chunk)
        part = loss if len(chunks) == 1 else loss * (len(chunk) / len(mine))
        if backward:
            last = i == len(chunks) - 1
            with model.no_sync() if RANKS.world > 1 and not last else contextlib.nullcontext():
                part.backward()
            part = part.detach()
        total = part if i == 0 else total + part
    return RANKS.mean(total, len(mine))


class Stop:
    """SIGINT (Ctrl-C), SIGTERM or SIGHUP set a flag; the loop finishes its step, checkpoints, and exits non-zero. A
    second Ctrl-C interrupts at once (KeyboardInterrupt; the last checkpoint, written atomically, stays). The path of
    one, and what --resume does: the comment above train.py's loop (train.train_method)."""
    signum = None

    @classmethod
    def install(cls):
        """Returns a function that puts the previous handlers back."""
        def handler(signum, frame):
            if cls.signum is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            cls.signum = signum

        cls.signum = None
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        return lambda: [signal.signal(s, h) for s, h in previous.items()]


def _rss_bytes(field):
    """VmRSS (resident now) or VmHWM (its peak) of this process, in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


class PeakMemory:
    """Peak memory of whatever runs after reset(): the CUDA allocator's peak, or the process's peak RSS (an
    upper bound that includes what ran before, where Linux cannot reset it: hwm_reset False)."""

    def __init__(self, device):
        self.cuda, self.device, self.baseline, self.hwm_reset = device.type == "cuda", device, 0, True

    @classmethod
    def start(cls, device):
        """The peak from now on."""
        memory = cls(device)
        memory.reset()
        return memory

    def reset(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            return
        with contextlib.suppress(OSError):  # freed heap back to the OS: no garbage of the build in the baseline
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.baseline = _rss_bytes("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM <- VmRSS (Linux >= 4.0)
        except OSError:
            self.hwm_reset = False

    def peak(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return _rss_bytes("VmHWM")


def device_name(device):
    return (torch.cuda.get_device_name(device) if device.type == "cuda" else
            f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)")
