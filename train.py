"""Fine-tune a Hugging Face language model with first-order (FO), zeroth-order (ZO, MeZO) or DiZO updates.

    python train.py                                   # fo vs zo vs dizo on the embedded tiny model, offline, CPU
    python train.py --model facebook/opt-1.3b --task sst-2 --data_dir data/SST-2 --method dizo

The methods share everything but the step: the same model loading, prompts, loss, data order, evaluation,
checkpoints and logging, so the comparison is fair by construction. Reads top to bottom: the settings, the
model, one training loop, the outputs.
"""

import argparse
import contextlib
import datetime
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

import data
import plots
import runs
from dizo import DiZO, ZOSGD, divergence, projected_params

METHODS = ("fo", "zo", "dizo")
BUILTIN = "builtin"  # --model value of the embedded tiny OPT
ROLES = ("q", "k", "v", "o")  # attention matrices whose divergence --track_divergence logs
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2, nothing written."""


# ---------------------------------------------------------------------------------------------------------
# Settings: one documented dataclass, from which the command line is generated. A default that depends on
# the model (the embedded tiny one or a real one) or on the machine is None in its field and resolved once in
# __post_init__; steps and lr are resolved per method (steps_for, lr_for).

# Real models: the released code's settings (MeZO / DiZO: ZO lr 1e-6, eps 1e-3, batch 16, constant lr; FO 1e-5).
REAL_DEFAULTS = dict(lr={"fo": 1e-5, "zo": 1e-6, "dizo": 1e-6}, steps={"fo": 20000, "zo": 20000, "dizo": 20000},
                     eval_every=500, zo_params="all", lr_schedule="constant")
# The embedded tiny model: 0.6M parameters take a far larger ZO lr than billions do; FO reaches its best dev
# accuracy within 300 steps. It trains what the released code trains, with its logs' decay: with the token
# embedding (and the head tied to it) trained at a constant rate, ZO reaches 0.985 dev accuracy, then collapses.
BUILTIN_DEFAULTS = dict(lr={"fo": 3e-4, "zo": 1.5e-4, "dizo": 1.5e-4},
                        steps={"fo": 300, "zo": 1500, "dizo": 1500}, eval_every=100, zo_params="no_embed",
                        lr_schedule="linear")


def flag(default, help, type=None):
    return field(default=default, metadata={"help": help, "type": type})


@dataclass
class Config:
    """Every setting of a run. Optimizer hyperparameters carry dizo.py's names and are checked there."""
    model: str = flag(BUILTIN, "hub name or local folder; 'builtin' = the embedded tiny OPT")
    task: str | None = flag(None, f"one of {', '.join(data.TASKS)}, or custom; default toy (built-in data)", str)
    data_dir: str | None = flag(None, "folder with train.tsv, dev.tsv, test.tsv", str)
    method: str = flag("all", "fo, zo, dizo or all")
    steps: int | None = flag(None, "training steps of every method (builtin: fo 300, zo/dizo 1500; real: 20000)", int)
    batch_size: int = flag(16, "examples per mini-batch")
    lr: float | None = flag(None, "learning rate (default per method and model)", float)
    eps: float = flag(1e-3, "ZO perturbation scale ε")
    seed: int = flag(0, "seed of the data order and the ZO directions")
    data_seed: int = flag(42, "seed of the train/dev/test sampling of --data_dir (built-in splits are fixed)")
    k: int | None = flag(None, "training examples per class (LM-BFF)", int)
    num_train: int | None = flag(None, "training examples (MeZO: 1000)", int)
    num_dev: int | None = flag(None, "dev examples (MeZO: 500)", int)
    num_test: int | None = flag(None, "test examples (MeZO: 1000)", int)
    eval_every: int | None = flag(None, "steps between dev evaluations and checkpoints (builtin 100, real 500)", int)
    out_dir: str = flag("runs/default", "where results.json, plots, checkpoints and --save go")
    dtype: str | None = flag(None, "fp32, or bf16 / fp16 (fp16: GPU only): fp32 weights, every forward under torch.autocast; "
                             "default bf16 for real models on a GPU, else fp32", str)
    half_weights: bool = flag(False, "store the weights in --dtype and step them in place (MeZO, the released "
                                     "--load_float16): 2 bytes per parameter, ZO steps round; FO keeps fp32")
    save: bool = flag(False, "save the final model(s) to out_dir/model/")
    template: str | None = flag(None, "prompt template with {sentence} and {mask}", str)
    label_words: str | None = flag(None, "comma-separated label words, one per class", str)
    direction: str = flag("gaussian", "ZO direction z: gaussian (MeZO, DiZO) or rademacher (±1, Spall's SPSA)")
    queries: int = flag(1, "q: directions per ZO step, their estimates averaged (DiZO eq. (1)); 2q forward passes")
    interval: int = flag(50, "DiZO κ: ZO steps between projections")
    proj_iters: int = flag(10, "DiZO M: γ-search iterations per projection")
    proj_eps: float = flag(0.1, "DiZO ε_γ")
    proj_lr: float = flag(2.0, "DiZO η_γ")
    tau: float = flag(0.2, "DiZO τ: ratio clipped to [1-τ, 1+τ]")
    phase_dev: int = flag(256, "DiZO: dev examples whose loss is measured before and after each phase, as "
                               "held-out telemetry (not training: not counted, not timed; 0: off)")
    anchor_device: str | None = flag(None, "DiZO: where θ0 lives, e.g. cpu to keep it off the GPU", str)
    zo_params: str | None = flag(None, "all, or no_embed (token embedding frozen); builtin no_embed, real all", str)
    lr_schedule: str | None = flag(None, "constant, or linear from lr to lr/2; builtin linear, real constant", str)
    lora: int = flag(0, "rank of PEFT LoRA adapters on the attention (0: fine-tune the weights themselves)")
    lora_alpha: float = flag(16.0, "LoRA scale alpha (the update is alpha/rank · BA)")
    lora_targets: str | None = flag(None, "comma-separated modules for LoRA (default PEFT's, e.g. q_proj,v_proj)", str)
    grad_accum: int = flag(1, "micro-batches per mini-batch, weighted to the whole batch's mean loss (FO: its gradient)")
    device_map: str | None = flag(None, "'auto': spread the model over the GPUs (and CPU) with accelerate", str)
    recipe: str | None = flag(None, "released: the settings of the released DiZO OPT runs (explicit flags win)", str)
    track_divergence: bool = flag(False, "log ‖W_t - W_0‖ of every attention Q, K, V, O matrix at each evaluation")
    resume: bool = flag(False, "continue the run in --out_dir from its checkpoints")
    overwrite: bool = flag(False, "replace an existing run in --out_dir")
    trust_remote_code: bool = flag(False, "allow a model's own Python code to run")

    def __post_init__(self):
        defaults = self.defaults
        for name in ("zo_params", "lr_schedule", "eval_every"):
            if getattr(self, name) is None:
                setattr(self, name, defaults[name])
        if self.dtype is None:  # fp32 weights, bf16 forward passes: 4 bytes per parameter, exact ZO steps
            self.dtype = "bf16" if not self.builtin and torch.cuda.is_available() else "fp32"
        self.task = self.task or ("toy" if self.builtin or self.data_dir is None else None)
        if self.task is not None and self.task.lower() in data.TASKS:  # sst-2 and SST-2 are the same task
            self.task = self.task.lower()
        if self.data_dir:  # data/SST-2/ and data/SST-2 are the same folder
            self.data_dir = os.path.normpath(self.data_dir)

    @property
    def builtin(self):
        return self.model == BUILTIN

    @property
    def defaults(self):
        return BUILTIN_DEFAULTS if self.builtin else REAL_DEFAULTS

    @property
    def methods(self):
        return METHODS if self.method == "all" else (self.method,)

    def steps_for(self, method):
        return self.defaults["steps"][method] if self.steps is None else self.steps

    def lr_for(self, method):
        return self.defaults["lr"][method] if self.lr is None else self.lr

    @property
    def roles(self):
        """What DiZO projects: K and V, as the released code; with LoRA, every attention matrix that carries
        adapters (the released code projects every LoRA factor, and its adapters sit on Q and V)."""
        return ROLES if self.lora else ("k", "v")

    def storage_dtype(self, method):
        """How the weights are held: fp32, or with --half_weights in --dtype (not FO's: its AdamW needs fp32)."""
        return self.dtype if self.half_weights and method != "fo" else "fp32"

    def run_flags(self):
        """The settings a resumed run must share with the saved one."""
        skip = {"method", "out_dir", "save", "resume", "overwrite", "trust_remote_code"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip} | {
            "methods": list(self.methods), "world_size": RANKS.world}


# --recipe released: what the released DiZO code ran for OPT on SST-2 (its script, its logs' learning-rate
# decay, MeZO's 1000/500/1000 sampling); fp16 weights where there is a GPU, as its --load_float16.
RECIPES = {"released": dict(zo_params="no_embed", lr_schedule="linear", lr=1e-6, eps=1e-3, batch_size=16,
                            interval=50, proj_iters=10, proj_eps=0.1, proj_lr=2.0, tau=0.2, steps=20000,
                            eval_every=500, num_train=1000, num_dev=500, num_test=1000)}


def parse_config(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(Config):
        if f.default is False:  # --no-half_weights undoes the recipe's
            action = argparse.BooleanOptionalAction if f.name == "half_weights" else "store_true"
            p.add_argument(f"--{f.name}", action=action, default=False, help=f.metadata["help"])
        else:
            p.add_argument(f"--{f.name}", default=f.default, help=f.metadata["help"],
                           type=f.metadata["type"] or type(f.default))
    args = p.parse_args(argv)
    if args.recipe is not None:  # the recipe's values become defaults, so that explicit flags still win
        settings = dict(RECIPES.get(args.recipe, {}))
        if args.data_dir is None:  # no recipe sets it: None means not given; the built-in splits are fixed
            settings = {k: v for k, v in settings.items() if k not in ("num_train", "num_dev", "num_test")}
        if torch.cuda.is_available():
            settings |= {"dtype": "fp16", "half_weights": True}
        p.set_defaults(**settings)
        print(f"--recipe {args.recipe} sets " + ", ".join(f"--{k}" if v is True else f"--{k} {v}"
                                                         for k, v in settings.items()))
        args = p.parse_args(argv)
    return Config(**vars(args))


def check_config(cfg):
    """Raise UsageError for a setting that cannot work, before anything is loaded or written."""
    choices = {"method": (*METHODS, "all"), "recipe": (None, *RECIPES), "zo_params": ("all", "no_embed"),
               "lr_schedule": ("constant", "linear"), "dtype": tuple(DTYPES)}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            names = ", ".join(a for a in allowed if a is not None)
            raise UsageError(f"--{name} must be one of {names}; got {getattr(cfg, name)!r}")
    if cfg.dtype == "fp16" and not torch.cuda.is_available():
        raise UsageError("--dtype fp16 needs a GPU: fp16 matmuls on the CPU are slow or unsupported; use fp32 or bf16")
    if cfg.half_weights and cfg.dtype == "fp32":
        raise UsageError("--half_weights stores the weights in --dtype: give --dtype bf16 or fp16")
    for name, least in (("steps", 0), ("batch_size", 1), ("eval_every", 1), ("k", 1), ("num_train", 1),
                        ("num_dev", 1), ("num_test", 1), ("lora", 0), ("grad_accum", 1), ("phase_dev", 0)):
        if getattr(cfg, name) is not None and getattr(cfg, name) < least:
            raise UsageError(f"--{name} must be >= {least}, got {getattr(cfg, name)}")
    if cfg.batch_size < RANKS.world * cfg.grad_accum:
        raise UsageError(f"--batch_size {cfg.batch_size} is the global mini-batch: it must hold at least one "
                         f"example per process ({RANKS.world}) and micro-batch ({cfg.grad_accum})")
    if cfg.device_map is not None and RANKS.world > 1:
        raise UsageError("--device_map splits one model over the GPUs; under torchrun each process holds a whole "
                         "model: use one or the other")
    if not 0 <= cfg.seed < 2**32:
        raise UsageError(f"--seed must be in [0, 2**32), got {cfg.seed}")
    try:
        torch.empty(0, device=cfg.anchor_device)  # None: the default device
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--anchor_device must be a device this machine has, e.g. cpu ({runs.first_line(e)})")
    for name in ("lr", "eps"):  # dizo.py accepts any finite value; for an LM, 1 or more is a typo (1e3 for 1e-3)
        if getattr(cfg, name) is not None and not getattr(cfg, name) < 1:
            raise UsageError(f"--{name} must be below 1 to fine-tune a language model, got {getattr(cfg, name)}")
    if not 0 < cfg.lora_alpha < math.inf:
        raise UsageError(f"--lora_alpha must be finite and > 0, got {cfg.lora_alpha}")
    if cfg.lora and cfg.track_divergence:
        raise UsageError("--track_divergence follows the attention weights, which --lora leaves frozen")
    if not cfg.out_dir.strip():  # "" would be the current folder, and a run would write beside the user's files
        raise UsageError("--out_dir must name a folder, e.g. runs/default; it was empty")
    if cfg.task is None:
        raise UsageError("--task is required with --data_dir (e.g. sst-2, rte, or custom with --template)")
    sampling = [f"--{n}" for n in ("k", "num_train", "num_dev", "num_test") if getattr(cfg, n) is not None]
    if sampling and cfg.data_dir is None:
        raise UsageError(f"{', '.join(sampling)} sample a --data_dir; the built-in task has fixed splits")
    if cfg.task != "toy" and cfg.data_dir is None:
        raise UsageError(f"--task {cfg.task} needs --data_dir (a folder with train.tsv, dev.tsv, test.tsv)")
    dummy = torch.nn.Parameter(torch.zeros(2, 2))  # the optimizers check their own hyperparameters
    try:
        for method in [m for m in cfg.methods if m != "fo"]:
            make_optimizer(method, [dummy], [("dummy", dummy)], cfg, cfg.lr_for(method))
    except ValueError as e:
        raise UsageError(f"--{e}")


# ---------------------------------------------------------------------------------------------------------
# The model and data: loaded and checked before anything is written.

def prepare(cfg):
    """The task's splits, the model's tokenizer and kind, and the loss, checked before anything is written."""
    task = data.get_task(cfg.task, template=cfg.template, label_words=cfg.label_words)
    if cfg.data_dir is None:
        raw = data.builtin_splits(data.TINY["seed"])  # the splits the built-in corpus was generated to avoid
    else:
        raw = data.load_splits(cfg.data_dir, task, k=cfg.k, num_train=cfg.num_train, num_dev=cfg.num_dev,
                               num_test=cfg.num_test, data_seed=cfg.data_seed)
    if cfg.builtin and RANKS.main:  # pretrained once into the cache; under torchrun the other ranks wait for it
        data.builtin_model()
    RANKS.barrier()
    name = data.builtin_model() if cfg.builtin else cfg.model
    setup = data.Setup.load(name, task, raw, RANKS.device, cfg.trust_remote_code,
                            projected="dizo" in cfg.methods or cfg.track_divergence)
    precision = cfg.dtype if cfg.dtype == "fp32" else f"{cfg.dtype}, {cfg.storage_dtype('zo')} weights"
    print(f"model {cfg.model} ({setup.kind} LM, {setup.model_type}) on {setup.device}, {precision}; task {task.name}: "
          f"{len(setup.splits['train'].labels)} train / {len(setup.splits['dev'].labels)} dev / "
          f"{len(setup.splits['test'].labels)} test")
    return setup


def load_model(cfg, setup, method):
    """The pretrained model, in the method's storage dtype; with --lora, in PEFT LoRA adapters. Frozen before
    DistributedDataParallel sees it: with --zo_params no_embed, the released code's set, the token embedding
    (and a head tied to it)."""
    model = data.load_model(setup.name, setup.kind, DTYPES[cfg.storage_dtype(method)], setup.device,
                            cfg.trust_remote_code, cfg.device_map)
    setup.loss_fn.device = model.get_input_embeddings().weight.device  # where the inputs go (--device_map)
    if cfg.lora:
        torch.manual_seed(cfg.seed)  # LoRA's A is random
        targets = cfg.lora_targets.split(",") if cfg.lora_targets else None
        model = data.add_lora(model, cfg.lora, cfg.lora_alpha, targets)
    if cfg.zo_params == "no_embed":
        model.get_input_embeddings().weight.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------------------
# Training: the optimizers, the one place where methods differ, torchrun's process group, and one loop for
# all of them.

def check_model(cfg, model, setup):
    """What the loaded model must allow, before anything is written: the data's token ids, DiZO's matrices, an ε
    that moves θ."""
    loss_fn = setup.loss_fn  # an id past the embedding's rows would be an IndexError in the middle of a run
    top = max([max(p) for enc in setup.splits.values() for p in enc.prompts] + [max(w) for w in loss_fn.words])
    if max(top, loss_fn.pad or 0) >= (rows := model.get_input_embeddings().weight.shape[0]):
        raise UsageError(f"--model {cfg.model}: the data's token ids reach {max(top, loss_fn.pad or 0)}, its embedding "
                         f"has {rows} rows: a tokenizer and a model that do not belong together")
    if "dizo" in cfg.methods:
        try:
            projected_params(model, roles=cfg.roles)
        except ValueError as e:
            raise UsageError(f"--method dizo: {e}") from None
    if cfg.methods != ("fo",):  # θ ± εz rounds back to θ where ε|z| is below half a unit in θ's last place
        sample = [p.detach().flatten()[::max(1, p.numel() // 1024)].float().cpu()  # the model may span devices
                  for p in model.parameters() if p.requires_grad]
        dtype = cfg.storage_dtype("zo")
        least = float(torch.cat(sample).abs().median()) * torch.finfo(DTYPES[dtype]).eps
        if cfg.eps < least:
            raise UsageError(f"--eps {cfg.eps:g} cannot move most {dtype} weights of this model (θ ± εz rounds "
                             f"back to θ); the smallest that can is about {least:.1g}")


class HeldOutDiZO(DiZO):
    """DiZO that also measures each phase on held-out data: held_out() (the loss on the first --phase_dev dev
    examples) before and after it, in last_phase as dev_loss_before/after. The search's own before/after is on
    its first batch, which it used to choose r; these passes are not training (not counted; time in held_out_s)."""

    def __init__(self, *args, held_out, **kwargs):
        super().__init__(*args, **kwargs)
        self.held_out, self.held_out_s = held_out, 0.0

    def _timed_held_out(self):
        tic = time.perf_counter()
        loss = self.held_out()
        self.held_out_s += time.perf_counter() - tic
        return loss

    @torch.no_grad()
    def project(self, next_closure):
        before = self._timed_held_out()
        super().project(next_closure)
        self.last_phase |= {"dev_loss_before": before, "dev_loss_after": self._timed_held_out()}


def make_optimizer(method, params, pairs, cfg, lr, search_data=None, search_loss=None, held_out=None):
    """AdamW for fo, ZOSGD for zo, DiZO projecting `pairs` (attention K and V) for dizo (with held_out(): each
    phase also measured on held-out data)."""
    if method == "fo":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    zo = dict(lr=lr, eps=cfg.eps, seed=cfg.seed, direction=cfg.direction, queries=cfg.queries)
    if method == "zo":
        return ZOSGD(params, **zo)
    extra = dict(held_out=held_out) if held_out else {}
    return (HeldOutDiZO if held_out else DiZO)(
        params, pairs, **zo, interval=cfg.interval, proj_iters=cfg.proj_iters, proj_eps=cfg.proj_eps,
        proj_lr=cfg.proj_lr, tau=cfg.tau, search_data=search_data, search_loss=search_loss,
        anchor_device=cfg.anchor_device, **extra)


def take_step(method, opt, closure, step):
    """One optimisation step, the only place where the methods differ; returns the loss."""
    if method != "fo":
        return opt.step(closure)  # ZO and DiZO: two forward passes (DiZO: + 2M + 2 at every κ-th step)
    opt.zero_grad(set_to_none=True)
    loss = closure()  # FO: forward and backward, micro-batch by micro-batch
    if not math.isfinite(float(loss)):
        raise FloatingPointError(f"non-finite loss {float(loss)} at FO step {step}")
    opt.step()
    return loss


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


class TrainLoss:
    """The loss of a training mini-batch (indices into `enc`) over this process's share of it, in `micro`
    micro-batches, counting its calls (forward passes: every method's cost). With backward=True (FO) each
    micro-batch's share of the loss is backpropagated as it is computed, so memory holds one micro-batch's
    activations. `model` may be wrapped in DistributedDataParallel."""

    def __init__(self, loss_fn, enc, model, micro=1, backward=False):
        self.loss_fn, self.enc, self.model, self.micro, self.backward, self.calls = (loss_fn, enc, model, micro,
                                                                                     backward, 0)

    def __call__(self, idx):
        self.calls += 1
        mine = RANKS.shard(idx)
        chunks = [mine[i::self.micro] for i in range(self.micro) if mine[i::self.micro]]
        total = 0.0
        for i, chunk in enumerate(chunks):
            loss = self.loss_fn.loss(self.model, self.enc, chunk)
            part = loss if len(chunks) == 1 else loss * (len(chunk) / len(mine))
            if self.backward:
                last = i == len(chunks) - 1  # DDP all-reduces the gradients once, at the last micro-batch
                with self.model.no_sync() if RANKS.world > 1 and not last else contextlib.nullcontext():
                    part.backward()
                part = part.detach()
            total = part if i == 0 else total + part
        return RANKS.mean(total, len(mine))


def evaluate(model, setup, split, count=None):
    """(accuracy, mean loss) on a split, or on its first `count` examples (each rank scores its share), in eval
    mode; the model's mode is put back after."""
    enc, was_training = setup.splits[split], model.training
    n = len(enc.labels) if count is None else min(count, len(enc.labels))
    model.eval()
    try:
        correct, total = RANKS.total(*setup.loss_fn.score(model, enc, RANKS.shard(range(n))))
    finally:
        model.train(was_training)
    return correct / n, total / n


def train_method(method, model, setup, cfg, out_dir, saved, record):
    """Train one method: a step, and every eval_every steps an evaluation and a checkpoint (results recorded
    with it). Returns the result dict: early on a signal, with status "diverged" on a non-finite loss."""
    peak = runs.PeakMemory(setup.device)
    peak.reset()
    ddp = method == "fo" and RANKS.world > 1  # FO under torchrun: gradients averaged across ranks
    forward = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    loss = TrainLoss(setup.loss_fn, setup.splits["train"], forward, cfg.grad_accum, backward=method == "fo")
    storage, compute = cfg.storage_dtype(method), cfg.dtype
    # fp32 weights and a half --dtype: every forward (training, γ search, evaluation) under torch.autocast
    setup.loss_fn.autocast = DTYPES[compute] if compute != storage else None
    run = build_run(method, model, setup, cfg, loss)
    r = run.restore(saved) if saved is not None else start_result(method, model, setup, cfg, run)
    loss.calls, losses = r["forward_passes"], []
    if saved is not None and saved.get("window"):  # stopped between evaluations: that entry is not a real one
        r["history"].pop()
        losses = saved["window"]
    model.train(method == "fo")  # dropout as in ordinary fine-tuning; ZO in eval mode, as MeZO's and DiZO's code
    steps, tic = cfg.steps_for(method), time.perf_counter()
    # closed however the loop ends (an error then starts on a line of its own)
    with tqdm(total=steps, initial=r["steps"], desc=method, dynamic_ncols=True, disable=not RANKS.main) as bar:
        while r["steps"] < steps:
            idx = run.batches.next()
            try:
                losses.append(float(take_step(method, run.opt, lambda: loss(idx), r["steps"] + 1)))
                r["steps"] += 1
                at_eval = r["steps"] % cfg.eval_every == 0 or r["steps"] == steps
                stopping = RANKS.agree(runs.Stop.signum is not None)
                if (at_eval or stopping) and not weights_finite(model):  # never checkpoint those
                    raise FloatingPointError(f"non-finite weights after step {r['steps']}")
            except FloatingPointError as e:
                error = " ".join([str(e), *getattr(e, "__notes__", [])])  # dizo.py says how θ was put back
                return r | {"status": "diverged", "error": error, "forward_passes": loss.calls}
            run.schedule.step()
            if method == "dizo" and run.opt.last_phase and run.opt.last_phase["step"] == r["steps"]:
                r["projection"].append(run.opt.last_phase)
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if at_eval or stopping:
                # training time only: evaluation is the same for all; DiZO's held-out phase measurements excluded
                r["wall_s"] += time.perf_counter() - tic - getattr(run.opt, "held_out_s", 0.0)
                run.opt.held_out_s = 0.0
                r["forward_passes"] = loss.calls
                r["history"].append(history_entry(r, model, setup, losses, run.anchor, full=at_eval))
                window, losses = ([] if at_eval else losses), []  # a resume goes on with a window a signal cut short
                if RANKS.main:
                    runs.save_checkpoint(out_dir, method, model, setup.tokenizer, run.state(r) | {"window": window})
                    record(r)  # after the checkpoint: results.json never names a step the checkpoint has not reached
                if stopping:
                    break
                tic = time.perf_counter()
    if r["steps"] == steps:
        finish_result(r, model, setup, peak)
    return r


def build_run(method, model, setup, cfg, loss):
    """The optimizer (on the parameters the method trains), the learning-rate schedule and the data order."""
    torch.manual_seed(cfg.seed)  # FO dropout; ZO methods run in eval mode and own their generators
    n_train = len(setup.splits["train"].labels)
    batches, fresh = (data.Batches(n_train, cfg.batch_size, cfg.seed + i) for i in (0, 1))
    params = [p for p in model.parameters() if p.requires_grad]  # see load_model
    roles = cfg.roles
    pairs = projected_params(model, roles=roles) if method == "dizo" else None
    held_out = (lambda: evaluate(model, setup, "dev", cfg.phase_dev)[1]) if cfg.phase_dev else None
    opt = make_optimizer(method, params, pairs, cfg, cfg.lr_for(method), fresh.next, loss, held_out)
    if pairs:
        anchor_mb = sum(t.numel() * t.element_size() for _, t in pairs) / 2**20
        print(f"dizo: projecting {len(pairs)} matrices ({', '.join(roles).upper()}), "
              f"{sum(t.numel() for _, t in pairs):,} parameters, anchor {anchor_mb:.1f} MB")
    # linear: from η to η/2 over the run, as in the released logs; constant: η throughout
    decay = 0.5 if cfg.lr_schedule == "linear" else 0.0
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - decay * t / max(1, cfg.steps_for(method)))
    anchor = {n: t.detach().clone() for n, t in projected_params(model, roles=ROLES)} if cfg.track_divergence else None
    return runs.Run(opt, schedule, batches, fresh, anchor)


def start_result(method, model, setup, cfg, run):
    """A new result: what trains, zero-shot test accuracy, dev accuracy at step 0."""
    r = {"method": method, "lr": cfg.lr_for(method), "status": "running", "history": [], "steps": 0,
         "forward_passes": 0, "wall_s": 0.0, "storage_dtype": cfg.storage_dtype(method),
         "compute_dtype": cfg.dtype,
         "trained_params": sum(p.numel() for g in run.opt.param_groups for p in g["params"])}
    if method == "dizo":
        r |= {"projected": list(run.opt.names), "projection": []}
    if cfg.track_divergence:
        r["matrix_sizes"] = {role: [t.numel() for _, t in projected_params(model, roles=(role,))]
                             for role in ROLES}
    r["zero_shot_acc"] = evaluate(model, setup, "test")[0]
    dev_acc, dev_loss = evaluate(model, setup, "dev")
    r["history"].append({"step": 0, "loss": None, "dev_acc": dev_acc, "dev_loss": dev_loss, "forward_passes": 0})
    return r


def history_entry(r, model, setup, losses, anchor, full):
    """One evaluation: mean training loss since the last, dev accuracy and loss (skipped when a signal cut the
    interval short), cost so far, and the divergence of every attention matrix if tracked."""
    entry = {"step": r["steps"], "loss": sum(losses) / len(losses), "dev_acc": None, "dev_loss": None,
             "forward_passes": r["forward_passes"], "wall_s": r["wall_s"]}
    if full:
        entry["dev_acc"], entry["dev_loss"] = evaluate(model, setup, "dev")
    if anchor is not None:
        entry["divergence"] = divergence(model, anchor, ROLES)
    return entry


def finish_result(r, model, setup, peak):
    r["best_dev_acc"] = max(h["dev_acc"] for h in r["history"] if h["dev_acc"] is not None)
    r["dev_loss"] = r["history"][-1]["dev_loss"]
    r["test_acc"] = evaluate(model, setup, "test")[0]
    r["peak_mem_mb"] = peak.peak() / 2**20
    r["device"] = (torch.cuda.get_device_name(setup.device) if setup.device.type == "cuda" else
                   f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)")
    r["status"] = "done"


def weights_finite(model):
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------
# Main: every method in turn on a freshly loaded model, then the outputs.

def train_all(cfg, setup, out_dir, results, model):
    """Train each method (skipping those a resumed run finished), the first on `model`, each later one on a
    freshly loaded copy; returns the exit code."""
    for method in cfg.methods:
        previous = results["methods"].get(method)
        if previous is not None and previous["status"] == "diverged":  # it would diverge again
            print(f"error: {method} diverged in the saved run ({previous['error']}); start a new run with other "
                  "flags", file=sys.stderr)
            return 1
        if previous is not None and previous["status"] == "done":
            if cfg.save and RANKS.main and not runs.saved_model_dir(cfg, out_dir, method).exists():  # added on resume
                save_from_checkpoint(cfg, setup, out_dir, method)
            model = None
            continue
        # the model main() loaded is the first method's; a later one (e.g. after a resume) loads its own dtype
        model = model if model is not None and method == cfg.methods[0] else load_model(cfg, setup, method)
        # a checkpoint is written before results.json names it: a run killed in between resumes from it
        saved = runs.load_checkpoint(out_dir, method, model) if cfg.resume else None

        def record(r, method=method):
            results["methods"][method] = r | {"world_size": RANKS.world}
            runs.write_json(out_dir / "results.json", results)

        r = train_method(method, model, setup, cfg, out_dir, saved, record)
        if r["status"] == "running":  # stopped by a signal before its last step
            r["status"] = "interrupted"
        if RANKS.main:
            if r["status"] == "done" and cfg.save:  # before results.json says done, and before a signal is obeyed
                runs.save_model(model, setup.tokenizer, runs.saved_model_dir(cfg, out_dir, method))
            record(r)
            if method == cfg.methods[-1] or r["status"] != "done":  # the figures, once the run ends
                plots.plot_run(results, out_dir)
        model = None
        if r["status"] == "diverged":
            kept = runs.checkpoint_dir(out_dir, method)
            where = f"the last good checkpoint is in {kept}" if kept.exists() else "no checkpoint was reached"
            print(f"error: {method} diverged: {r['error']}; {where}", file=sys.stderr)
            return 1
        if r["status"] == "interrupted" or RANKS.agree(runs.Stop.signum is not None):
            print(f"interrupted at {method} step {r['steps']}: results and a checkpoint are in {out_dir}; "
                  f"continue with the same flags and --resume", file=sys.stderr)
            return 128 + (runs.Stop.signum or signal.SIGTERM)
    if RANKS.main:
        print_table(results)
        print(f"results: {out_dir / 'results.json'}, plot: {out_dir / 'curves.png'}")
    return 0


def save_from_checkpoint(cfg, setup, out_dir, method):
    """--save given when resuming a run whose `method` had finished: its model from its final checkpoint."""
    model = load_model(cfg, setup, method)
    if runs.load_checkpoint(out_dir, method, model) is None:
        raise runs.RunError(f"--save: {method} finished without a checkpoint to save it from; run it again")
    runs.save_model(model, setup.tokenizer, runs.saved_model_dir(cfg, out_dir, method))


def print_table(results):
    """The end-of-run summary, one row per method."""
    cells = {"zero_shot_acc": "{:.3f}", "best_dev_acc": "{:.3f}", "dev_loss": "{:.4f}", "test_acc": "{:.3f}",
             "steps": "{}", "forward_passes": "{}", "wall_s": "{:.1f}", "peak_mem_mb": "{:.0f}"}
    rows = [("method", "zero-shot", "best dev", "dev loss", "test", "steps", "fwd passes", "train s", "peak MB",
             "status")]
    rows += [(method, *(f.format(r[k]) if r.get(k) is not None else "-" for k, f in cells.items()), r["status"])
             for method, r in results["methods"].items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows[:1] + [["-" * w for w in widths]] + rows[1:]:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))


def main(argv=None):
    """Command-line entry point; returns the exit code (0 ok, 1 diverged or a write failed, 2 bad input,
    128+n signal n)."""
    transformers.utils.logging.disable_progress_bar()  # ours is the one that matters
    cfg = parse_config(argv)
    try:
        check_config(cfg)
        out_dir = Path(cfg.out_dir)
        folder = dict(out_dir=out_dir, resume=cfg.resume, overwrite=cfg.overwrite, inputs=(cfg.model, cfg.data_dir))
        runs.check_out_dir(settings=cfg.run_flags(), **folder)  # fail fast, before loading
        RANKS.start()
        setup = prepare(cfg)
        model = load_model(cfg, setup, cfg.methods[0])  # broken weights are found before anything is written
        check_model(cfg, model, setup)
        runs.check_disk_space(out_dir, runs.disk_needed(cfg, model))
        # rank 0 owns the output folder; the others read the results.json it holds once rank 0 has claimed it
        settings = cfg.run_flags() | {"data_hash": setup.data_hash, "model_hash": runs.model_hash(model)}
        results, lock = runs.claim_out_dir(settings=settings, **folder) if RANKS.main else (None, None)
        RANKS.barrier()
        results = results if RANKS.main else runs.check_out_dir(settings=settings, **folder | {"resume": True})
        RANKS.barrier()
        restore_signals = runs.Stop.install()
        try:
            return train_all(cfg, setup, out_dir, results, model)
        except RuntimeError as e:
            if RANKS.world == 1:
                raise
            # under torchrun, a collective fails when another process of the run died
            print(f"error: rank {RANKS.rank} lost the other processes ({runs.first_line(e)[:120]}); the last "
                  "checkpoint is kept, continue with --resume", file=sys.stderr)
            return 1
        finally:
            restore_signals()
            if lock is not None:
                lock.close()
            RANKS.stop()
    except (UsageError, data.DataError, runs.RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a folder removed under us: the last complete checkpoint stays
        print(f"error: {e}; the last complete checkpoint (if any) is kept", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, keep the last checkpoint
        print("error: interrupted; the last checkpoint (if any) is kept, continue with --resume", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
