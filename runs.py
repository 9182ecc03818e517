"""The run's folder: everything a run writes and reads back, and what keeps it safe. Files are written atomically
and never through a symbolic link; the folder is one run's at a time (a lock); nothing train.py did not write is
replaced or removed; a resume is refused when its flags, data, base model or world size differ; signals stop a run
at the end of a step with a checkpoint."""
import contextlib
import ctypes
import gc
import hashlib
import json
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import torch


class RunError(ValueError):
    """A run folder, checkpoint or model folder that cannot be used: printed as one line, nothing written."""


def first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0]}" if str(err).strip() else type(err).__name__


# ------------------------------------------------------------------------------------- the run's folder
# Every write atomic; the folder is one run's at a time (a lock), and nothing train.py did not write is replaced or
# removed: its results.json carries FORMAT, and OUTPUTS are the only names it writes.
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


def write_json(path, obj):
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2)))


def save_model(model, tokenizer, folder, state=None):
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


def save_checkpoint(out_dir, method, model, tokenizer, state):
    save_model(model, tokenizer, out_dir / "checkpoints" / method, state)


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
        if (out_dir / ASIDE).exists():
            raise RunError(f"--resume: an --overwrite of {out_dir} was interrupted; run it again with --overwrite")
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
        lock = open(out_dir / ".lock", "w")
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
    weights = sum(p.numel() * 4 for p in model.parameters())  # fp32 at most
    trained = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    checkpoint = weights + (2 * trained if "fo" in cfg.methods else 0) + 2**24
    return 2 * checkpoint + (len(cfg.methods) * weights if cfg.save else 0)


def saved_model_dir(cfg, out_dir, method):
    return out_dir / "model" / method if len(cfg.methods) > 1 else out_dir / "model"


def model_hash(model):
    """A fingerprint of the pretrained weights (LoRA adapters left out): names, shapes and up to 4096 entries of
    each tensor, so that a resume from a different base model is refused."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if "lora_" not in name:
            sample = p.detach().flatten()[::max(1, p.numel() // 4096)].float().cpu()
            h.update(f"{name}{tuple(p.shape)}".encode() + sample.numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Run:
    """One method's training state besides the weights: what a checkpoint holds (`state`, `restore`)."""
    opt: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    batches: object  # data.Batches: the order of the training examples
    fresh: object  # data.Batches of DiZO's γ-search
    anchor: dict | None  # pretrained attention matrices, with --track_divergence

    def parts(self):
        return {"optimizer": self.opt, "schedule": self.schedule, "batches": self.batches, "fresh": self.fresh}

    def state(self, r):
        return {k: part.state_dict() for k, part in self.parts().items()} | {
            "result": r, "anchor": self.anchor, "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}

    def restore(self, state):
        """Continue from `state`; returns the results so far."""
        for k, part in self.parts().items():
            part.load_state_dict(state[k])
        self.anchor = state["anchor"]
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        return state["result"]


# ------------------------------------------------------------------------------- signals, memory
class Stop:
    """SIGINT / SIGTERM set a flag; the loop finishes its step, checkpoints, and exits non-zero.
    A second Ctrl-C interrupts at once."""
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
