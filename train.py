"""Fine-tune a Hugging Face language model with first-order (FO), zeroth-order (ZO, MeZO) or DiZO updates.

    python train.py                                   # fo vs zo vs dizo on the embedded tiny model, offline
    python train.py --model facebook/opt-1.3b --task sst-2 --data_dir data/SST-2 --method dizo

One training step of each method (take_step), L(θ) being a mini-batch's loss, one forward pass:
    fo    loss = L(θ); loss.backward(); AdamW step                                           1 forward, 1 backward
    zo    z ~ N(0, I) (or ±1) from a fresh seed; g = (L(θ + εz) - L(θ - εz)) / 2ε; θ -= lr·g·z  2 forward passes
    dizo  the zo step; then every κ steps (--interval) a projection phase                      + 2M + 2 per phase
A phase moves each attention K and V matrix (--lora: each adapter's factors) along its drift from θ0, the weights before
training: θ_l <- θ0_l + r_l(θ_l - θ0_l), with one ratio r_l in [1 - τ, 1 + τ] per matrix. A zeroth-order search, the
"γ search" (γ_l = r_l‖θ_l - θ0_l‖), picks the ratios in M = --proj_iters steps of 2 passes; 2 more passes log the loss
before and after. --queries q averages q directions (2q passes); --grad_accum's micro-batches count as one pass.

It reads top to bottom: Config, the model, the methods, the loss, the loop, main, main's helpers. Where to look:
  the loop        train_method (train.py:249), its `for step`; one step of each method: take_step (train.py:194)
  a ZO step       ZOSGD.step (dizo.py:169) -> ZOSGD._zo_step (dizo.py:139); the ±εz passes: ZOSGD._query (dizo.py:128)
  a DiZO step     DiZO.step (dizo.py:252): the ZO step, then every κ steps DiZO.project (dizo.py:289); here
                  HeldOutDiZO.project (train.py:443) wraps it to also score dev data (not counted as training passes)
  optimizers      make_optimizer (train.py:174); what each method trains: trained_parameters (train.py:162)
  a batch's loss  TrainLoss (train.py:213) -> PromptLoss.loss (data.py:384); a forward: PromptLoss.scores (data.py:361)
  evaluation      evaluate (train.py:233); what is recorded: new_run (train.py:309), Run.record (runs.py:359)
  the run folder  the comment above the loop; a checkpoint: Run.checkpoint (runs.py:371); Ctrl-C: Stop (runs.py:485);
                  --resume: check_out_dir (runs.py:140), load_checkpoint (runs.py:107), Run.restore (runs.py:301)
Elsewhere: runs.py the run folder, data.py data and models, config.py flags and their checks, plots.py figures.
"""

import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

import data
import plots
import runs
from config import (BUILTIN, DTYPES, METHODS, ROLES, UsageError, check_config, check_model, dizo_roles, flag,
                    parse_config, run_flags)
from dizo import DiZO, ZOSGD, divergence, projected_params
from runs import RANKS

# ---------------------------------------------------------------------------------------------------------
# Settings: one dataclass, the command line built from it (config.py); model-dependent defaults: the dicts below.

# Real models: MeZO's README (every weight, ZO lr 1e-6 as DiZO's logs, eps 1e-3, batch 16, constant lr, 20,000 steps);
# FO: MeZO's finetune.sh, AdamW 1e-5 for 625 steps (at its batch 8; ours 16). DiZO's logs' setup: --recipe released.
REAL_DEFAULTS = dict(lr={"fo": 1e-5, "zo": 1e-6, "dizo": 1e-6}, steps={"fo": 625, "zo": 20000, "dizo": 20000},
                     eval_every=500, trained="all", lr_schedule="constant")
# The embedded tiny model: 0.6M parameters take a far larger ZO lr; FO's dev accuracy peaks within 300 steps, ZO's dev
# loss levels off near 1,000 (3 min on 2 cores). Frozen embedding, decaying lr, as released: without them ZO collapses.
BUILTIN_DEFAULTS = dict(lr={"fo": 3e-4, "zo": 1.5e-4, "dizo": 1.5e-4}, steps={"fo": 300, "zo": 1000, "dizo": 1000},
                        eval_every=100, trained="no_embed", lr_schedule="linear")


@dataclass
class Config:
    """Every setting of a run. Optimizer hyperparameters carry dizo.py's names and are checked there."""
    model: str = flag(BUILTIN, "hub name or local folder; 'builtin' = the embedded tiny OPT")
    task: str | None = flag(None, f"one of {', '.join(data.TASKS)}, or custom; default toy (built-in data)", str)
    data_dir: str | None = flag(None, "folder with train.tsv, dev.tsv, test.tsv", str)
    method: str = flag("all", "fo, zo, dizo or all")
    steps: int | None = flag(None, "steps per method (builtin: fo 300, zo/dizo 1000; real: fo 625, zo/dizo 20000)", int)
    batch_size: int = flag(16, "examples per mini-batch")
    lr: float | None = flag(None, "learning rate (default per method and model)", float)
    eps: float = flag(1e-3, "ZO perturbation scale ε")
    seed: int = flag(0, "seed of the data order, the ZO directions, the γ search, LoRA's init and FO's dropout")
    data_seed: int = flag(42, "seed of the train/dev/test sampling of --data_dir (built-in splits are fixed)")
    k: int | None = flag(None, "training examples per class (LM-BFF)", int)
    num_train: int | None = flag(None, "training examples (MeZO: 1000)", int)
    num_dev: int | None = flag(None, "dev examples (MeZO: 500)", int)
    num_test: int | None = flag(None, "test examples (MeZO: 1000)", int)
    eval_every: int | None = flag(None, "steps between dev evaluations and checkpoints (builtin 100, real 500)", int)
    out_dir: str = flag("runs/default", "where results.json, plots, checkpoints and --save go")
    dtype: str | None = flag(None, "fp32, fp64, or bf16 / fp16 (fp16: GPU only): fp32 weights, forwards under "
                             "autocast. Default: fp64 for the embedded model; real ones bf16 on a GPU, else fp32", str)
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
    phase_dev: int = flag(256, "DiZO: dev examples scored before and after each phase (telemetry; 0: off)")
    anchor_device: str | None = flag(None, "DiZO: where θ0 lives, e.g. cpu to keep it off the GPU", str)
    trained: str | None = flag(None, "what every method trains (--lora: the adapters): all (real default), or no_embed "
                                     "(the token embedding and a head tied to it frozen, as released; builtin)", str)
    lr_schedule: str | None = flag(None, "constant, or linear from lr to lr/2; builtin linear, real constant", str)
    lora: int = flag(0, "rank of PEFT LoRA adapters on the attention (0: fine-tune the weights themselves)")
    lora_alpha: float = flag(16.0, "LoRA scale alpha (the update is alpha/rank · BA)")
    lora_targets: str | None = flag(None, "comma-separated modules for LoRA (default PEFT's, e.g. q_proj,v_proj)", str)
    grad_accum: int = flag(1, "micro-batches per mini-batch, weighted to the batch's mean loss (FO: its gradient)")
    device_map: str | None = flag(None, "'auto': spread the model over the GPUs (and CPU) with accelerate", str)
    recipe: str | None = flag(None, "released: the settings of the released DiZO OPT runs (explicit flags win)", str)
    track_divergence: bool = flag(False, "log ‖W_t - W_0‖ of every attention Q, K, V, O matrix at each evaluation")
    resume: bool = flag(False, "continue the run in --out_dir from its checkpoints")
    overwrite: bool = flag(False, "replace an existing run in --out_dir")
    trust_remote_code: bool = flag(False, "allow a model's own Python code to run")

    def __post_init__(self):
        for name in ("trained", "lr_schedule", "eval_every"):
            if getattr(self, name) is None:
                setattr(self, name, self.defaults[name])
        if self.dtype is None:  # on a GPU bf16: fp32 weights (4 bytes a parameter), bf16 forwards, fp32 ZO steps
            self.dtype = "fp64" if self.builtin else "bf16" if torch.cuda.is_available() else "fp32"
        self.task = self.task or ("toy" if self.builtin or self.data_dir is None else None)
        if self.task is not None and self.task.lower() in data.TASKS:  # sst-2 and SST-2 are the same task
            self.task = self.task.lower()
        self.data_dir = self.data_dir and os.path.normpath(self.data_dir)  # data/SST-2/ and data/SST-2: one folder

    builtin = property(lambda self: self.model == BUILTIN)
    defaults = property(lambda self: BUILTIN_DEFAULTS if self.builtin else REAL_DEFAULTS)
    methods = property(lambda self: METHODS if self.method == "all" else (self.method,))

    def steps_for(self, method):
        return self.defaults["steps"][method] if self.steps is None else self.steps

    def lr_for(self, method):
        return self.defaults["lr"][method] if self.lr is None else self.lr

    def zo_settings(self, method):
        """ZOSGD's arguments (dizo.py's names, checked there), and DiZO's with method dizo."""
        zo = dict(lr=self.lr_for(method), eps=self.eps, seed=self.seed, direction=self.direction, queries=self.queries)
        return zo if method == "zo" else zo | dict(interval=self.interval, proj_iters=self.proj_iters,
                                                   proj_eps=self.proj_eps, proj_lr=self.proj_lr, tau=self.tau,
                                                   anchor_device=self.anchor_device)

    def storage_dtype(self, method):
        """How the weights are held: fp64 with --dtype fp64; else fp32, or with --half_weights in --dtype (not FO's)."""
        return self.dtype if self.dtype == "fp64" or (self.half_weights and method != "fo") else "fp32"


# ---------------------------------------------------------------------------------------------------------
# The model: loaded fresh for each method, and which of its parameters the method trains.

def load_model(cfg, setup, method):
    """The pretrained model in its storage dtype, only what the method trains (trained_parameters) requiring grad."""
    model = data.load_model(setup.name, setup.kind, DTYPES[cfg.storage_dtype(method)], setup.device,
                            cfg.trust_remote_code, cfg.device_map)
    setup.loss_fn.device = model.get_input_embeddings().weight.device  # where the inputs go (--device_map)
    # fp32 weights, a half --dtype: every forward (training, γ search, evaluation) under torch.autocast
    setup.loss_fn.autocast = DTYPES[cfg.dtype] if cfg.dtype != cfg.storage_dtype(method) else None
    if cfg.lora:
        torch.manual_seed(cfg.seed)  # LoRA's A is random
        targets = cfg.lora_targets.split(",") if cfg.lora_targets else None
        model = data.add_lora(model, cfg.lora, cfg.lora_alpha, targets)  # adapters on the attention, B = 0
    model.requires_grad_(False)  # then what every method trains, before DistributedDataParallel sees the model
    for p in trained_parameters(model, cfg):
        p.requires_grad_(True)
    return model


def trained_parameters(model, cfg):
    """What every method trains, fo too: with --lora the adapters alone; otherwise every parameter, except the token
    embedding (and an output head tied to it: the same tensor) with --trained no_embed, the released set."""
    if cfg.lora:
        return [p for name, p in model.named_parameters() if "lora_" in name]
    frozen = model.get_input_embeddings().weight if cfg.trained == "no_embed" else None
    return [p for p in model.parameters() if p is not frozen]


# ---------------------------------------------------------------------------------------------------------
# The methods: AdamW, ZO-SGD (MeZO) and DiZO, and take_step, where their updates differ.

def make_optimizer(method, model, setup, cfg, batch_loss, search_batches):
    """Each method's optimizer; all three update trained_parameters (dizo's phases also rescale the projected ones).
        fo    torch.optim.AdamW, no weight decay
        zo    ZOSGD (dizo.py)
        dizo  DiZO (dizo.py): every κ steps it projects the matrices of dizo_roles (config.py:61), found by
              projected_params (dizo.py:366): K, V, or with --lora the adapted roles' LoRA factors. By default
              HeldOutDiZO (train.py:429), adding each phase's dev loss before and after (--phase_dev examples)."""
    params = trained_parameters(model, cfg)
    if method == "fo":
        return torch.optim.AdamW(params, lr=cfg.lr_for(method), weight_decay=0.0)
    if method == "zo":
        return ZOSGD(params, **cfg.zo_settings(method))
    pairs = projected_params(model, roles=dizo_roles(cfg, model))
    search = dict(search_data=search_batches.next, search_loss=batch_loss)  # batch_loss(search_batches.next())
    if not cfg.phase_dev:
        return DiZO(params, pairs, **cfg.zo_settings(method), **search)
    return HeldOutDiZO(params, pairs, **cfg.zo_settings(method), **search,
                       held_out=lambda: evaluate(model, setup, "dev", cfg.phase_dev)[1])


def take_step(method, opt, closure, step):
    """One step, where the methods' updates differ; closure(): this step's mini-batch loss (TrainLoss). zo and dizo
    (dizo.py, no_grad), z redrawn from the step's seed at each use: θ += εz; ℓ+ = closure(); θ -= 2εz; ℓ- = closure();
    g = (ℓ+ - ℓ-) / 2ε; θ += εz - lr·g·z (dizo: a phase every κ-th step). Returns L(θ) (fo) or ℓ+ (zo, dizo)."""
    if method != "fo":
        return opt.step(closure)  # ZOSGD.step (dizo.py:169), or DiZO.step (dizo.py:252): + a phase every κ-th step
    opt.zero_grad(set_to_none=True)
    loss = closure()  # FO: forward and backward (--grad_accum: micro-batch by micro-batch; torchrun: each rank's share)
    if not math.isfinite(float(loss)):
        raise FloatingPointError(f"non-finite loss {float(loss)} at FO step {step}")
    opt.step()
    return loss


# ---------------------------------------------------------------------------------------------------------
# The loss of a batch (one forward pass) and evaluation. The loss is data.PromptLoss. For a causal LM with one-token
# label words (" great", " terrible") and left-padded prompts, in fp32 or fp64, it equals (others: PromptLoss.scores)
#   F.cross_entropy(model(**prompts).logits[:, -1, word_ids], labels)     (a softmax over the label words alone)

class TrainLoss:
    """A training mini-batch's loss (indices into `enc`, the training split): one forward pass, the unit of cost,
    counted in `calls` (one call however the batch is split); with backward=True (FO) also backpropagated. Under
    torchrun or --grad_accum, split_loss (runs.py:466) takes this rank's share, a backward per micro-batch."""

    def __init__(self, loss_fn, enc, model, micro=1, backward=False):
        self.loss_fn, self.enc, self.model, self.micro, self.backward = loss_fn, enc, model, micro, backward
        self.calls = 0

    def __call__(self, idx):
        self.calls += 1
        if RANKS.world > 1 or self.micro > 1:
            return runs.split_loss(self.loss_fn, self.enc, self.model, idx, self.micro, self.backward)
        loss = self.loss_fn.loss(self.model, self.enc, idx)  # data.PromptLoss: cross-entropy over the label words
        if self.backward:
            loss.backward()
            loss = loss.detach()
        return loss


def evaluate(model, setup, split, count=None):
    """(accuracy, mean loss) on a split or its first `count` examples (each rank scores its share), in eval mode.
    Called before training, at each evaluation and at the end (train_method), and by HeldOutDiZO."""
    enc, was_training = setup.splits[split], model.training
    n = len(enc.labels) if count is None else min(count, len(enc.labels))
    model.eval()
    try:
        correct, loss_sum = RANKS.total(*setup.loss_fn.score(model, enc, RANKS.shard(range(n))))
    finally:
        model.train(was_training)
    return correct / n, loss_sum / n


# ---------------------------------------------------------------------------------------------------------
# The training loop: one method, from the pretrained model or, with --resume, from its last checkpoint.

def train_method(method, model, setup, cfg, folder, saved=None):
    """Train one method from the pretrained model, or from --resume's checkpoint (`saved`). Returns its result, with
    status done, interrupted (a signal stopped it before the last step) or diverged (a non-finite loss or weight); a
    signal during the last step leaves it done, and main still exits 128 + n. It evaluates:
        before training                 zero-shot test accuracy, and dev as step 0 (not when resuming)
        every --eval_every, and last    dev: a history entry and a checkpoint (the comment above the loop)
        at the end                      test accuracy, of the last weights (not the best dev's)"""
    memory = runs.PeakMemory.start(setup.device)
    torch.manual_seed(cfg.seed)  # FO's dropout; ZO methods run in eval mode and own their generators
    n_train, steps = len(setup.splits["train"].labels), cfg.steps_for(method)
    batches = data.Batches(n_train, cfg.batch_size, cfg.seed)  # the order of the training examples
    search_batches = data.Batches(n_train, cfg.batch_size, cfg.seed + 1)  # DiZO's γ search: an order of its own
    # FO under torchrun: DistributedDataParallel averages the gradients across ranks
    ddp = torch.nn.parallel.DistributedDataParallel(model) if method == "fo" and RANKS.world > 1 else model
    batch_loss = TrainLoss(setup.loss_fn, setup.splits["train"], ddp, cfg.grad_accum, backward=method == "fo")
    opt = make_optimizer(method, model, setup, cfg, batch_loss, search_batches)
    decay = 0.5 if cfg.lr_schedule == "linear" else 0.0  # linear: from lr down toward lr/2, as the released logs
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - decay * t / max(1, steps))
    parts = {"optimizer": opt, "schedule": schedule, "batches": batches, "search_batches": search_batches}
    run = new_run(method, model, setup, cfg, folder, opt, batch_loss, parts)  # parts: what a checkpoint holds
    if saved is not None:  # --resume: put back the checkpoint's optimizer (DiZO: its θ0), schedule, data orders, RNGs
        run.restore(saved)  # and results (without a signal's entry: it has no dev numbers)
    else:  # before training: zero-shot test accuracy, dev accuracy and loss
        run.begin(evaluate(model, setup, "test")[0], evaluate(model, setup, "dev"))
    model.train(method == "fo")  # dropout as in ordinary fine-tuning; ZO in eval mode, as MeZO's and DiZO's code
    # What the run writes, and what a signal and --resume do (the functions are runs.py's):
    # - each evaluation: a history entry (Run.record (runs.py:359)), such as zo's at step 100: {"step": 100, "loss":
    #   0.498 (the mean since the last entry), "dev_acc": 0.79, "dev_loss": 0.456, "forward_passes": 200, "wall_s":
    #   6.1}; the checkpoint (Run.checkpoint (runs.py:371)): checkpoints/<method>/ replaced whole by the model
    #   (--lora: the adapters), the tokenizer and trainer_state.pt (`parts`, DiZO's θ0 in the optimizer's state, the
    #   RNGs, the result so far); then results.json.
    # - Ctrl-C, SIGTERM or SIGHUP: Stop (runs.py:485) sets a flag; the step finishes; an entry (between evaluations,
    #   without dev numbers) and a checkpoint are written; the loop breaks; train_all returns 128 + the signal, the
    #   exit code. A second Ctrl-C raises KeyboardInterrupt: the run stops at once, with no new checkpoint.
    # - --resume, in order: 1. main refuses changed flags, data, model or process count (check_out_dir (runs.py:140),
    #   open_folder). 2. train_all skips finished methods (a diverged one: exit 1); load_checkpoint (runs.py:107) loads
    #   the weights (none yet: the method starts anew). 3. Here Run.restore (runs.py:301) puts back the rest; DiZO's
    #   saved θ0 replaces make_optimizer's in DiZO.load_state_dict (dizo.py:332). 4. The loop goes on after that step.
    for step in run.steps(steps):  # 1..steps, or from the restored step + 1; Run.steps (runs.py:334)
        idx = batches.next()  # one mini-batch: every pass of the ZO step sees it (a phase draws its own)
        try:
            train_loss = take_step(method, opt, lambda: batch_loss(idx), step)
            run.log(train_loss, opt)  # losses, forward passes, DiZO's phase: Run.log (runs.py:340)
            schedule.step()
            evaluating = step % cfg.eval_every == 0 or step == steps
            stopping = run.stop_requested()  # a signal, here or on another rank: Run.stop_requested (runs.py:355)
            if evaluating or stopping:
                run.record(evaluate(model, setup, "dev") if evaluating else (None, None))  # a history entry
                run.checkpoint(cut_short=not evaluating)  # checkpoints/<method>/ (weights, state), then results.json
        except FloatingPointError as e:
            return run.diverged(e)
        if stopping:
            break
    if run.step < steps:  # a signal stopped it
        return run.r | {"status": "interrupted"}
    return run.r | {"best_dev_acc": max(h["dev_acc"] for h in run.r["history"] if h["dev_acc"] is not None),
                    "dev_loss": run.r["history"][-1]["dev_loss"], "test_acc": evaluate(model, setup, "test")[0],
                    "peak_mem_mb": memory.peak() / 2**20, "device": runs.device_name(setup.device), "status": "done"}


def new_run(method, model, setup, cfg, folder, opt, batch_loss, parts):
    """The method's entry in results.json and the Run that fills it in: these fields; zero_shot_acc and history's step 0
    (Run.begin); with dizo, projection, one per phase (step, ratios, distances, loss and dev_loss before and after); at
    the end best_dev_acc, dev_loss, test_acc, peak_mem_mb, device (train_method), world_size (folder.write)."""
    r = {"method": method, "lr": cfg.lr_for(method), "status": "running", "history": [], "steps": 0,
         "forward_passes": 0, "wall_s": 0.0, "storage_dtype": cfg.storage_dtype(method), "compute_dtype": cfg.dtype,
         "trained_params": sum(p.numel() for g in opt.param_groups for p in g["params"]),
         "loss_is": "L(θ)" if method == "fo" else "L(θ+εz)"}  # the training loss logged: ZO's first pass, as MeZO
    if method == "dizo":
        r |= {"projected": list(opt.names), "projection": []}
        roles, ms = dizo_roles(cfg, model), opt.matrices  # the projected matrices, the anchor θ0 their copy
        print(f"dizo: projecting {len(ms)} matrices ({', '.join(roles).upper()}), {sum(t.numel() for t in ms):,} "
              f"parameters, anchor {sum(t.numel() * t.element_size() for t in ms) / 2**20:.1f} MB")
    w0 = track = None
    if cfg.track_divergence:  # ‖W - W0‖ of every attention matrix at each evaluation
        w0 = {n: t.detach().clone() for n, t in projected_params(model, roles=ROLES)}
        r["matrix_sizes"] = {role: [t.numel() for _, t in projected_params(model, roles=(role,))] for role in ROLES}
        track = lambda w0: divergence(model, w0, ROLES)  # noqa: E731
    return runs.Run(folder, method, model, setup.tokenizer, parts, batch_loss, r, w0, track)


# ---------------------------------------------------------------------------------------------------------
# Main: check everything, claim the run's folder, train each method in turn, print the table.

def main(argv=None):
    """The command line; exit code 0 ok, 1 diverged, a failed write or a lost process, 2 bad input, 128+n signal n."""
    transformers.utils.logging.disable_progress_bar()  # ours is the one that matters
    cfg = parse_config(Config, argv, __doc__.split("\n\n")[0])
    try:
        check_config(cfg)
        out_dir = Path(cfg.out_dir)
        where = dict(out_dir=out_dir, resume=cfg.resume, overwrite=cfg.overwrite, inputs=(cfg.model, cfg.data_dir))
        runs.check_out_dir(settings=run_flags(cfg), **where)  # fail fast, before loading
        RANKS.start()
        setup = prepare(cfg)
        model = load_model(cfg, setup, cfg.methods[0])  # broken weights are found before anything is written
        check_model(cfg, model, setup)
        runs.check_disk_space(out_dir, runs.disk_needed(cfg, model))
        settings = run_flags(cfg) | {"data_hash": setup.data_hash, "model_hash": runs.model_hash(model)}
        folder = runs.open_folder(settings=settings, **where)  # locked: from here on the folder is this run's
        restore_signals = runs.Stop.install()
        try:
            return train_all(cfg, setup, folder, model)
        except RuntimeError as e:  # under torchrun: another process of the run died (one process: re-raised)
            return runs.lost_other_ranks(e)
        finally:
            restore_signals()
            folder.close()
            RANKS.stop()
    except (UsageError, data.DataError, runs.RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a folder removed under us: the last complete checkpoint stays
        print(f"error: {e}; the last complete checkpoint (if any) is kept", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C (or one before Stop.install): stop at once
        print("error: interrupted; the last checkpoint (if any) is kept, continue with --resume", file=sys.stderr)
        return 128 + signal.SIGINT


def train_all(cfg, setup, folder, model):
    """Train each method not yet finished (--resume), the first on `model`, later ones anew; returns the exit code."""
    for method in cfg.methods:
        previous = folder.results["methods"].get(method)
        if previous is not None and previous["status"] == "diverged":  # it would diverge again
            print(f"error: {method} diverged in the saved run ({previous['error']}); start a new run with other "
                  "flags", file=sys.stderr)
            return 1
        if previous is not None and previous["status"] == "done":
            if cfg.save and RANKS.main and not runs.saved_model_dir(cfg, folder.out_dir, method).exists():
                runs.save_from_checkpoint(cfg, folder.out_dir, method, load_model(cfg, setup, method), setup.tokenizer)
            model = None
            continue
        # the model main() loaded is the first method's; a later one (e.g. after a resume) loads its own dtype
        model = model if model is not None and method == cfg.methods[0] else load_model(cfg, setup, method)
        # a checkpoint is written before results.json names it: a run killed in between resumes from it
        saved = runs.load_checkpoint(folder.out_dir, method, model) if cfg.resume else None
        r = train_method(method, model, setup, cfg, folder, saved)
        if RANKS.main:
            if r["status"] == "done" and cfg.save:  # before results.json says done, and before a signal is obeyed
                runs.save_final_model(cfg, folder.out_dir, method, model, setup.tokenizer)
            folder.write(method, r)
            if method == cfg.methods[-1] or r["status"] != "done":  # the figures, once the run ends
                plots.plot_run(folder.results, folder.out_dir)
        model = None
        if r["status"] == "diverged":
            return runs.report_divergence(folder.out_dir, method, r["error"])  # one line, exit code 1
        if r["status"] == "interrupted" or RANKS.agree(runs.Stop.signum is not None):
            if RANKS.main:  # one line for the run, not one per process
                print(f"interrupted at {method} step {r['steps']}: results and a checkpoint are in "
                      f"{folder.out_dir}; continue with the same flags and --resume", file=sys.stderr)
            return 128 + (runs.Stop.signum or signal.SIGTERM)
    if RANKS.main:
        plots.print_table(folder.results)
        print(f"results: {folder.out_dir / 'results.json'}, plot: {folder.out_dir / 'curves.png'}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# Below main: prepare (data, tokenizer, loss) and HeldOutDiZO (dizo's default); the command line's checks: config.py.

def prepare(cfg):
    """The task's splits, the model's tokenizer and kind, and the loss, checked before anything is written."""
    task = data.get_task(cfg.task, template=cfg.template, label_words=cfg.label_words)
    if cfg.data_dir is None:
        raw = data.builtin_splits(data.TINY["seed"])  # the splits the built-in corpus was generated to avoid
    else:
        raw = data.load_splits(cfg.data_dir, task, k=cfg.k, num_train=cfg.num_train, num_dev=cfg.num_dev,
                               num_test=cfg.num_test, data_seed=cfg.data_seed)
    name = data.builtin_model() if cfg.builtin else cfg.model  # the shipped tiny OPT, checked
    setup = data.Setup.load(name, task, raw, RANKS.device, cfg.trust_remote_code,
                            projected="dizo" in cfg.methods or cfg.track_divergence)
    precision = cfg.dtype if cfg.dtype in ("fp32", "fp64") else f"{cfg.dtype}, {cfg.storage_dtype('zo')} weights"
    if RANKS.main:
        print(f"model {cfg.model} ({setup.kind} LM, {setup.model_type}) on {setup.device}, {precision}; task "
              f"{task.name}: {len(setup.splits['train'].labels)} train / {len(setup.splits['dev'].labels)} dev / "
              f"{len(setup.splits['test'].labels)} test")
    return setup


class HeldOutDiZO(DiZO):
    """DiZO that also measures each phase on held-out data: held_out(), the loss on the first --phase_dev dev examples,
    before and after it (last_phase's dev_loss_before/after); not training passes, not counted; timed in held_out_s."""

    def __init__(self, *args, held_out, **kwargs):
        super().__init__(*args, **kwargs)
        self.held_out, self.held_out_s = held_out, 0.0

    def _timed_held_out(self):
        tic, loss = time.perf_counter(), self.held_out()
        self.held_out_s += time.perf_counter() - tic
        return loss

    @torch.no_grad()
    def project(self, next_closure):
        before = self._timed_held_out()
        super().project(next_closure)
        self.last_phase |= {"dev_loss_before": before, "dev_loss_after": self._timed_held_out()}


if __name__ == "__main__":
    sys.exit(main())
