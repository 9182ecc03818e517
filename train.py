"""Fine-tune a Hugging Face language model with first-order (FO), zeroth-order (ZO, MeZO) or DiZO updates.

    python train.py                                   # fo vs zo vs dizo on the embedded tiny model, offline, CPU
    python train.py --model facebook/opt-1.3b --task sst-2 --data_dir data/SST-2 --method dizo

The three methods share everything but the step: the same model loading, prompts, loss, data order,
evaluation, checkpoints and logging, so the comparison is fair by construction. Reads top to bottom:
arguments, the embedded default model, model loading, the prompt-based loss, the training loop, output.
"""

import argparse
import ctypes
import gc
import hashlib
import json
import math
import os
import resource
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

import data
from dizo import DiZO, ZOSGD, projected_params, projection_report

METHODS = ("fo", "zo", "dizo")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BUILTIN = "builtin"  # --model value of the embedded tiny OPT
MAX_LENGTH = 256  # tokens per prompt + label word; LM-BFF and MeZO prompts are far shorter
EVAL_BATCH = 32  # examples per forward pass in evaluation; any value gives the same accuracy


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2, nothing written."""


# ---------------------------------------------------------------------------------------------------------
# Arguments. Defaults that depend on the model (embedded tiny model vs a real one) are resolved in
# `resolve_defaults`, so that `--help` shows both.

# Released-code defaults for real models (MeZO / DiZO: ZO lr 1e-6, eps 1e-3, batch 16, constant lr; FO 1e-5).
REAL_DEFAULTS = dict(lr={"fo": 1e-5, "zo": 1e-6, "dizo": 1e-6}, steps={"fo": 20000, "zo": 20000, "dizo": 20000},
                     eval_every=500)
# Our defaults for the embedded tiny model: a 0.6M-parameter model needs a far larger ZO lr than billions of
# parameters do. FO reaches its best dev accuracy within 300 steps there; ZO's plateaus after ~300 of its 1500 (README).
BUILTIN_DEFAULTS = dict(lr={"fo": 3e-4, "zo": 1.5e-4, "dizo": 1.5e-4},
                        steps={"fo": 300, "zo": 1500, "dizo": 1500}, eval_every=100)


def parse_args(argv=None):
    """The command line; flag names are fixed (README), defaults that depend on the model are None here."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=BUILTIN, help="hub name or local folder; 'builtin' = embedded tiny OPT")
    p.add_argument("--task", default=None, help=f"one of {', '.join(data.TASKS)}; default toy (builtin data)")
    p.add_argument("--data_dir", default=None, help="folder with train.tsv, dev.tsv, test.tsv")
    p.add_argument("--method", default="all", help="fo, zo, dizo or all")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of every method (builtin: fo 300, zo/dizo 1500; real: 20000)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=None, help="learning rate (default per method and model)")
    p.add_argument("--eps", type=float, default=1e-3, help="ZO perturbation scale ε")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order and the ZO directions")
    p.add_argument("--data_seed", type=int, default=42,
                   help="seed of the train/dev/test sampling of --data_dir (the built-in task's splits are fixed)")
    p.add_argument("--k", type=int, default=None, help="training examples per class (LM-BFF)")
    p.add_argument("--num_train", type=int, default=None, help="training examples (MeZO: 1000)")
    p.add_argument("--num_dev", type=int, default=None, help="dev examples (MeZO: 500)")
    p.add_argument("--num_test", type=int, default=None, help="test examples (MeZO: 1000)")
    p.add_argument("--eval_every", type=int, default=None, help="steps between dev evaluations/checkpoints")
    p.add_argument("--out_dir", default="runs/default")
    p.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16 (fp16 needs a GPU)")
    p.add_argument("--save", action="store_true", help="save the final model(s) to out_dir/model/")
    p.add_argument("--template", default=None, help="prompt template with {sentence} and {mask}")
    p.add_argument("--label_words", default=None, help="comma-separated label words, one per class")
    p.add_argument("--interval", type=int, default=50, help="DiZO κ: ZO steps between projections")
    p.add_argument("--proj_iters", type=int, default=10, help="DiZO M: γ-search iterations per projection")
    p.add_argument("--proj_eps", type=float, default=0.1, help="DiZO ε_γ")
    p.add_argument("--proj_lr", type=float, default=2.0, help="DiZO η_γ")
    p.add_argument("--tau", type=float, default=0.2, help="DiZO τ: ratio clipped to [1-τ, 1+τ]")
    p.add_argument("--track_divergence", action="store_true",
                   help="log ‖W_t - W_0‖ of every attention Q, K, V, O matrix at each evaluation")
    p.add_argument("--resume", action="store_true", help="continue the run in --out_dir from its checkpoints")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out_dir")
    p.add_argument("--trust_remote_code", action="store_true", help="allow a model's own Python code")
    return p.parse_args(argv)


def resolve_defaults(args):
    """Validate every argument and fill in the model-dependent defaults; raises UsageError."""
    methods = METHODS if args.method == "all" else (args.method,)
    if args.method != "all" and args.method not in METHODS:
        raise UsageError(f"--method must be one of fo, zo, dizo, all; got {args.method!r}")
    if args.dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}; got {args.dtype!r}")
    if args.dtype == "fp16" and not torch.cuda.is_available():
        raise UsageError("--dtype fp16 needs a GPU: fp16 matmuls on the CPU are slow or unsupported; "
                         "use fp32 or bf16")
    builtin = args.model == BUILTIN
    defaults = BUILTIN_DEFAULTS if builtin else REAL_DEFAULTS
    args.methods = methods
    args.steps_of = {m: defaults["steps"][m] if args.steps is None else args.steps for m in methods}
    args.eval_every = defaults["eval_every"] if args.eval_every is None else args.eval_every
    args.lrs = {m: defaults["lr"][m] if args.lr is None else args.lr for m in methods}
    args.task = args.task or ("toy" if builtin or args.data_dir is None else None)
    checks = [("steps", args.steps is None or args.steps >= 0, ">= 0"), ("seed", args.seed >= 0, ">= 0"),
              ("batch_size", args.batch_size >= 1, ">= 1"), ("lr", args.lr is None or args.lr >= 0, ">= 0"),
              ("eps", args.eps > 0, "> 0"),
              ("eval_every", args.eval_every >= 1, ">= 1"), ("interval", args.interval >= 1, ">= 1"),
              ("proj_iters", args.proj_iters >= 1, ">= 1"), ("proj_eps", args.proj_eps > 0, "> 0"),
              ("proj_lr", args.proj_lr >= 0, ">= 0"), ("tau", 0 < args.tau < 1, "in (0, 1)")]
    for n in ("k", "num_train", "num_dev", "num_test"):
        checks.append((n, getattr(args, n) is None or getattr(args, n) >= 1, ">= 1"))
    for name, ok, why in checks:
        if not ok:
            raise UsageError(f"--{name} must be {why}, got {getattr(args, name)}")
    if args.task is None:
        raise UsageError("--task is required with --data_dir (e.g. sst-2, rte, or custom with --template)")
    sampling = [f"--{n}" for n in ("k", "num_train", "num_dev", "num_test") if getattr(args, n) is not None]
    if sampling and args.data_dir is None:
        raise UsageError(f"{', '.join(sampling)} sample a --data_dir; the built-in task has fixed splits")
    if args.task != "toy" and args.data_dir is None:
        raise UsageError(f"--task {args.task} needs --data_dir (a folder with train.tsv, dev.tsv, test.tsv)")
    return args


# ---------------------------------------------------------------------------------------------------------
# The embedded default: a tiny OPT pretrained here, once, on data.builtin_corpus(), and cached as an ordinary
# Hugging Face folder, so that it loads through the same from_pretrained path as facebook/opt-125m.

TINY = dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, ffn_dim=512,
            max_position_embeddings=64, pretrain_steps=800, pretrain_lr=3e-3, pretrain_batch=32, seed=0)


def cache_root():
    return Path(os.environ.get("DIZO_CACHE", Path.home() / ".cache" / "dizo"))


def builtin_model_dir():
    """Where the embedded model lives; the name changes whenever its recipe or corpus changes."""
    corpus = data.builtin_corpus(TINY["seed"])
    key = hashlib.sha256(json.dumps([TINY, corpus[:50], len(corpus)]).encode()).hexdigest()[:12]
    return cache_root() / f"tiny-opt-{key}"


def build_builtin_model(folder):
    """Pretrain the tiny OPT with AdamW on the built-in corpus (next-token loss) and save it atomically."""
    # One thread: a matmul split over threads sums in another order, and over 800 steps those last-bit
    # differences grow into a different model, one on which ZO may no longer learn the task. On one thread
    # the embedded model is the same bit for bit on every machine with the same torch and CPU kernels.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pretrain_and_save(folder)
    finally:
        torch.set_num_threads(threads)


def pretrain_and_save(folder):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(TINY["seed"])
    corpus = data.builtin_corpus(TINY["seed"])
    tokenizer = data.build_tokenizer(corpus)
    config = OPTConfig(vocab_size=len(tokenizer), hidden_size=TINY["hidden_size"],
                       num_hidden_layers=TINY["num_hidden_layers"], ffn_dim=TINY["ffn_dim"],
                       num_attention_heads=TINY["num_attention_heads"], word_embed_proj_dim=TINY["hidden_size"],
                       max_position_embeddings=TINY["max_position_embeddings"], dropout=0.0,
                       attention_dropout=0.0, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = OPTForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=TINY["pretrain_lr"], weight_decay=0.01)
    steps = TINY["pretrain_steps"]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=TINY["pretrain_lr"], total_steps=steps)
    order = torch.Generator().manual_seed(TINY["seed"])
    bar = tqdm(range(steps), desc="pretraining the embedded tiny OPT (once)", leave=False)
    for _ in bar:
        idx = torch.randint(len(corpus), (TINY["pretrain_batch"],), generator=order).tolist()
        enc = tokenizer([corpus[i] for i in idx], return_tensors="pt", padding=True)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)
    print(f"embedded tiny OPT: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"pretrained {steps} steps, final LM loss {loss.item():.3f}, saved to {folder}")


def builtin_model():
    folder = builtin_model_dir()
    if not (folder / "config.json").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        build_builtin_model(folder)
    return str(folder)


# ---------------------------------------------------------------------------------------------------------
# Loading any Hugging Face causal or masked LM, with errors a user can act on.

def model_kind(config):
    """'causal' or 'masked', from the config's architecture; UsageError for anything else."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING

    archs = " ".join(config.architectures or [])
    if "MaskedLM" in archs:
        return "masked"
    if "CausalLM" in archs or "LMHeadModel" in archs:
        return "causal"
    if not archs:  # a config without the trained head's name: go by what the model type supports
        if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
            return "causal"
        if type(config) in MODEL_FOR_MASKED_LM_MAPPING:
            return "masked"
    raise UsageError(f"{config.name_or_path or 'the model'} ({config.model_type}) is neither a causal nor a "
                     "masked language model")


def load_config(name, trust_remote_code):
    """The model's config from a local folder or the hub, with one-line errors for the usual mistakes."""
    from transformers import AutoConfig

    local = Path(name).is_dir()
    if local and not (Path(name) / "config.json").exists():
        raise UsageError(f"--model {name}: folder has no config.json, not a Hugging Face model")
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as e:
        if local:
            raise UsageError(f"--model {name}: cannot read the model folder ({str(e).splitlines()[0]})")
        raise UsageError(f"--model {name}: not a local folder, and the hub could not be reached or has no "
                         "such model (offline?)")
    except ValueError as e:
        if "custom code" in str(e) or "trust_remote_code" in str(e):
            raise UsageError(f"--model {name} needs its own Python code to load; pass --trust_remote_code "
                             "only if you trust it")
        raise UsageError(f"--model {name}: {str(e).splitlines()[0]}")


def load_tokenizer(name, trust_remote_code):
    """The model's tokenizer; UsageError if it cannot be loaded."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {name}: cannot load its tokenizer ({str(e).splitlines()[0]})")


def load_model(name, kind, dtype, device, trust_remote_code):
    """The model, in eval mode. Weights load through safetensors, or torch.load with weights_only=True, as
    transformers does by default: never an arbitrary pickle."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    cls = AutoModelForCausalLM if kind == "causal" else AutoModelForMaskedLM
    try:
        model = cls.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {name}: cannot load its weights ({str(e).splitlines()[0]})")
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------------------
# The prompt-based classification loss (PAPER.md §6), shared by every method.
#   causal: score(c) = mean log p(label word c's tokens | prompt); loss = CE over the candidates' scores.
#   masked: score(c) = logit of label word c at the mask; loss = CE over the candidates.

@dataclass
class Encoded:
    """A split, tokenised once: prompt token ids per example and the label."""
    prompts: list
    labels: list


class PromptLoss:
    """The classification loss and accuracy of a prompted LM on a task; see the comment above."""

    def __init__(self, task, tokenizer, kind, device, max_length=MAX_LENGTH):
        self.task, self.tok, self.kind, self.device = task, tokenizer, kind, device
        self.max_length = max_length
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        words = task.causal_words if kind == "causal" else task.label_words
        self.words = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
        for w, ids in zip(words, self.words):
            if not ids:
                raise UsageError(f"label word {w!r} is empty after tokenisation")
            if kind == "masked" and len(ids) != 1:
                raise UsageError(f"label word {w!r} is {len(ids)} tokens for this tokenizer; a masked LM "
                                 "needs single-token label words (try a leading space, or another word)")
        if kind == "masked" and tokenizer.mask_token is None:
            raise UsageError("the tokenizer has no mask token, so the model cannot be used as a masked LM")

    def encode(self, examples):
        """Tokenise the prompts of a split once; keeps the end of a prompt that is too long."""
        if self.kind == "causal":
            texts = [data.causal_prompt(self.task, e) for e in examples]
        else:
            texts = [data.masked_prompt(self.task, e, self.tok.mask_token) for e in examples]
        ids = self.tok(texts)["input_ids"]
        room = self.max_length - max(len(w) for w in self.words)
        # Keep the end of a long prompt: the template's words next to the label word matter most.
        prompts = [p if len(p) <= room else p[:1] + p[len(p) - room + 1:] for p in ids]
        if self.kind == "masked":
            mask_id = self.tok.mask_token_id
            if any(mask_id not in p for p in prompts):
                raise UsageError("a prompt lost its mask token to truncation; shorten the texts or template")
        return Encoded(prompts, [e.label for e in examples])

    def scores(self, model, prompts):
        """[batch, candidates] scores; the forward pass is the only model call."""
        if self.kind == "masked":
            return self._masked_scores(model, prompts)
        return self._causal_scores(model, prompts)

    def _masked_scores(self, model, prompts):
        length = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), length), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p)
            mask[i, :len(p)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        rows = torch.arange(len(prompts), device=self.device)
        at_mask = logits[rows, (ids == self.tok.mask_token_id).long().argmax(1)]
        return at_mask[:, [w[0] for w in self.words]].float()

    def _left_padded(self, seqs):
        """Model inputs for token lists, left-padded so that all end at the last position."""
        length = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), length), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, length - len(s):] = torch.tensor(s)
            mask[i, length - len(s):] = 1
        positions = (mask.cumsum(1) - 1).clamp_min(0)  # so that left padding does not shift positions
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device),
                "position_ids": positions.to(self.device)}

    def _causal_scores(self, model, prompts):
        if all(len(w) == 1 for w in self.words):
            return self._causal_next_token_scores(model, prompts)
        # One sequence per (example, candidate), LEFT-padded so that every sequence ends at the same
        # position: the candidate's tokens are then the last ones, and the model only has to produce the
        # logits of the last (longest word + 1) positions (logits_to_keep), not of the whole sequence.
        seqs = [p + w for p in prompts for w in self.words]
        keep = max(len(w) for w in self.words) + 1
        logits = model(**self._left_padded(seqs), logits_to_keep=keep).logits
        logp = logits[:, :-1].float().log_softmax(-1)  # logp[:, j] predicts token length - keep + j + 1
        scores = []
        for i, s in enumerate(seqs):
            w = self.words[i % len(self.words)]
            targets = torch.tensor(w, device=self.device)
            scores.append(logp[i, keep - 1 - len(w):, :].gather(1, targets[:, None]).mean())
        return torch.stack(scores).view(len(prompts), len(self.words))

    def _causal_next_token_scores(self, model, prompts):
        """Single-token label words: the mean log-prob of a one-token word is its next-token log-prob, so
        one sequence per example scores every candidate at once (half the tokens of one per candidate)."""
        logits = model(**self._left_padded(prompts), logits_to_keep=1).logits
        return logits[:, -1].float().log_softmax(-1)[:, [w[0] for w in self.words]]

    def loss(self, model, enc, idx):
        """Cross-entropy over the candidates' scores of examples idx of an encoded split."""
        labels = torch.tensor([enc.labels[i] for i in idx], device=self.device)
        return torch.nn.functional.cross_entropy(self.scores(model, [enc.prompts[i] for i in idx]), labels)

    @torch.no_grad()
    def accuracy(self, model, enc, batch_size=EVAL_BATCH):
        """Share of examples whose highest-scoring candidate is the label."""
        correct = 0
        for start in range(0, len(enc.labels), batch_size):
            idx = range(start, min(start + batch_size, len(enc.labels)))
            pred = self.scores(model, [enc.prompts[i] for i in idx]).argmax(1).cpu()
            correct += int((pred == torch.tensor([enc.labels[i] for i in idx])).sum())
        return correct / len(enc.labels)


# ---------------------------------------------------------------------------------------------------------
# Data order: endless shuffled mini-batches, reproducible from a seed and resumable from (epoch, position).

class Batches:
    """Indices of the next mini-batch, from a new random permutation each epoch (seeded by seed and epoch)."""

    def __init__(self, n, batch_size, seed):
        self.n, self.batch_size, self.seed = n, min(batch_size, n), seed
        self.epoch, self.pos = 0, 0
        self._shuffle()

    def _shuffle(self):
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        self.order = torch.randperm(self.n, generator=gen).tolist()

    def next(self):
        if self.pos + self.batch_size > self.n:  # drop the ragged tail: every batch has the same size
            self.epoch, self.pos = self.epoch + 1, 0
            self._shuffle()
        idx = self.order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state):
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._shuffle()


# ---------------------------------------------------------------------------------------------------------
# Files: every write is atomic (temporary name, then rename), so a kill never leaves half a file.

def write_json(path, obj):
    """Write JSON atomically: to a temporary file, then rename over the old one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def save_dir_atomically(folder, write):
    """write(tmp_folder) fills a fresh folder, which then replaces `folder` (old copy kept until done)."""
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_dir(out_dir, method):
    folder = out_dir / "checkpoints" / method
    old = folder.with_name(method + ".old")
    return old if not folder.exists() and old.exists() else folder  # a kill between the two renames


def save_checkpoint(out_dir, method, model, tokenizer, state):
    """A complete model folder (loadable with from_pretrained) plus the trainer state to resume from."""
    def write(tmp):
        model.save_pretrained(tmp)  # safetensors
        tokenizer.save_pretrained(tmp)
        torch.save(state, tmp / "trainer_state.pt")

    save_dir_atomically(out_dir / "checkpoints" / method, write)


# ---------------------------------------------------------------------------------------------------------
# Training one method.

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
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return lambda: [signal.signal(s, h) for s, h in previous.items()]


def reset_peak_memory(device):
    """Start counting a method's peak memory afresh, so that one method's peak does not hide in another's:
    CUDA's allocator statistics, or on Linux the process's RSS high-water mark (VmHWM, reset through
    /proc/self/clear_refs after returning freed memory to the system)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not glibc / not Linux: the peak below is then the whole process's


def peak_memory_mb(device):
    """Peak memory since reset_peak_memory: CUDA allocated bytes, or the RSS high-water mark (weights included)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**10
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


ROLES = ("q", "k", "v", "o")


def attention_divergence(model, anchor):
    """‖W_t - W_0‖_F of every attention matrix (PAPER.md §2): {role: [layer 0, layer 1, ...]}."""
    with torch.no_grad():
        return {role: [float(torch.linalg.vector_norm((t - anchor[n]).float()))
                       for n, t in projected_params(model, roles=(role,))] for role in ROLES}


def make_optimizer(method, model, args, lr):
    """AdamW for fo, ZOSGD for zo, DiZO (projecting K and V, reported) for dizo."""
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "fo":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if method == "zo":
        return ZOSGD(params, lr=lr, eps=args.eps, seed=args.seed)
    pairs = projected_params(model)
    report = projection_report(pairs)
    print(f"dizo: projecting {report['matrices']} matrices (attention K and V), {report['params']:,} "
          f"parameters, anchor {report['anchor_bytes'] / 2**20:.1f} MB")
    return DiZO(params, pairs, lr=lr, eps=args.eps, seed=args.seed, interval=args.interval,
                proj_iters=args.proj_iters, proj_eps=args.proj_eps, proj_lr=args.proj_lr, tau=args.tau)


def take_step(method, opt, step, closure, fresh_closure):
    """One optimisation step, the only place where the methods differ; returns the loss."""
    if method == "zo":
        return opt.step(closure)
    if method == "dizo":
        return opt.step(closure, fresh_closure=fresh_closure)
    loss = closure()
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"non-finite loss at FO step {step + 1}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def train_method(method, model, loss_fn, splits, args, out_dir, resume_state, record):
    """Train, evaluate every eval_every steps, checkpoint (and `record` the results) at each evaluation;
    returns the result dict. Returns early on a signal, and with status "diverged" on a non-finite loss
    (the last checkpoint stays)."""
    device = next(model.parameters()).device
    reset_peak_memory(device)
    torch.manual_seed(args.seed)  # FO dropout; ZO methods run in eval mode and own their generators
    opt = make_optimizer(method, model, args, args.lrs[method])
    batches = Batches(len(splits["train"].labels), args.batch_size, args.seed)
    fresh = Batches(len(splits["train"].labels), args.batch_size, args.seed + 1)  # DiZO's γ-search batches
    anchor = None
    if args.track_divergence:
        anchor = {n: t.detach().clone() for n, t in projected_params(model, roles=ROLES)}
    r = {"method": method, "lr": args.lrs[method], "status": "running", "history": [], "steps": 0,
         "forward_passes": 0, "wall_s": 0.0}
    if args.track_divergence:
        r["matrix_sizes"] = {role: [t.numel() for _, t in projected_params(model, roles=(role,))]
                             for role in ROLES}
    if resume_state is not None:
        opt.load_state_dict(resume_state["optimizer"])
        batches.load_state_dict(resume_state["batches"])
        fresh.load_state_dict(resume_state["fresh"])
        torch.set_rng_state(resume_state["torch_rng"])
        if resume_state["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(resume_state["cuda_rng"])
        r = resume_state["result"]
        anchor = resume_state.get("anchor")
    else:
        r["zero_shot_acc"] = loss_fn.accuracy(model, splits["test"])
        r["history"].append({"step": 0, "loss": None, "dev_acc": loss_fn.accuracy(model, splits["dev"])})
    passes = {"n": r["forward_passes"]}

    def closure_for(idx):
        def closure():
            passes["n"] += 1
            return loss_fn.loss(model, splits["train"], idx)
        return closure

    def checkpoint():
        state = {"optimizer": opt.state_dict(), "batches": batches.state_dict(), "fresh": fresh.state_dict(),
                 "torch_rng": torch.get_rng_state(), "result": r, "anchor": anchor,
                 "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}
        save_checkpoint(out_dir, method, model, loss_fn.tok, state)
        record(r)  # after the checkpoint: results.json never names a step the checkpoint has not reached

    if method == "fo":
        model.train()  # dropout as in ordinary fine-tuning; ZO methods need it off (see dizo.py)
    steps = args.steps_of[method]
    bar = tqdm(range(r["steps"], steps), desc=method, initial=r["steps"], total=steps, dynamic_ncols=True)
    tic, losses = time.perf_counter(), []
    for step in bar:
        try:
            loss = take_step(method, opt, step, closure_for(batches.next()), lambda: closure_for(fresh.next()))
        except FloatingPointError as e:
            bar.close()
            r |= {"status": "diverged", "error": str(e), "forward_passes": passes["n"]}
            return r
        losses.append(float(loss))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        r["steps"] = step + 1
        if r["steps"] % args.eval_every == 0 or r["steps"] == steps or Stop.signum is not None:
            r["wall_s"] += time.perf_counter() - tic  # training time only: evaluation is the same for all
            r["forward_passes"] = passes["n"]
            model.eval()
            entry = {"step": r["steps"], "loss": sum(losses) / len(losses), "dev_acc": None,
                     "forward_passes": r["forward_passes"], "wall_s": r["wall_s"]}
            if Stop.signum is None or r["steps"] % args.eval_every == 0:
                entry["dev_acc"] = loss_fn.accuracy(model, splits["dev"])
            if anchor is not None:
                entry["divergence"] = attention_divergence(model, anchor)
            r["history"].append(entry)
            if method == "fo":
                model.train()
            losses = []
            checkpoint()
            if Stop.signum is not None:
                bar.close()
                return r
            tic = time.perf_counter()
    bar.close()
    model.eval()
    devs = [h["dev_acc"] for h in r["history"] if h["dev_acc"] is not None]
    r["best_dev_acc"] = max(devs)
    r["test_acc"] = loss_fn.accuracy(model, splits["test"])
    r["peak_mem_mb"] = peak_memory_mb(device)
    r["device"] = (torch.cuda.get_device_name(device) if device.type == "cuda" else
                   f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)")
    r["status"] = "done"
    return r


# ---------------------------------------------------------------------------------------------------------
# Output: results.json, a plot, a table.

def save_figure(fig, path):
    """Write a matplotlib figure atomically, then free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name("tmp-" + path.name)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def plot_curves(results, path):
    """Dev accuracy and training loss against steps, one line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.8))
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
    √(entries), so that ZO's size-only movement (η|g|√n per step, PAPER.md §2) shows as flat lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [(m, r) for m, r in results["methods"].items() if "divergence" in r["history"][-1]]
    fig, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 3.4), squeeze=False, sharey=True)
    for ax, (method, r) in zip(axes[0], methods):
        last = r["history"][-1]
        for role, dists in last["divergence"].items():
            per_entry = [d / math.sqrt(n) for d, n in zip(dists, r["matrix_sizes"][role])]
            ax.plot(range(len(dists)), per_entry, marker="o", label=role.upper())
        ax.set(title=f"{method}, step {last['step']}", xlabel="layer", yscale="log",
               xticks=range(len(dists)))
        ax.grid(alpha=0.3, which="both")
        ax.legend(ncol=4, fontsize=8)
    axes[0][0].set_ylabel("‖W - W0‖ / √entries")
    save_figure(fig, path)


def print_table(results):
    """The end-of-run summary, one row per method."""
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


# ---------------------------------------------------------------------------------------------------------
# Main.

RUN_FLAGS = ("model", "task", "data_dir", "steps", "batch_size", "lr", "eps", "seed", "data_seed", "k",
             "num_train", "num_dev", "num_test", "eval_every", "dtype", "template", "label_words", "interval",
             "proj_iters", "proj_eps", "proj_lr", "tau", "track_divergence")


def prepare_out_dir(args):
    """The run's results so far: fresh, or (with --resume) the saved ones after checking the flags match."""
    out_dir = Path(args.out_dir)
    results_path = out_dir / "results.json"
    config = {k: getattr(args, k) for k in RUN_FLAGS} | {"methods": list(args.methods)}
    if args.resume:
        if not results_path.exists():
            raise UsageError(f"--resume: no results.json in {out_dir}, nothing to resume")
        results = json.loads(results_path.read_text())
        changed = [k for k in config if results["config"].get(k) != config[k]]
        if changed:
            raise UsageError(f"--resume: flags differ from the saved run: {', '.join(changed)}")
        return out_dir, results
    if results_path.exists() and not args.overwrite:
        raise UsageError(f"{out_dir} already holds a run; pass --overwrite to replace it or --resume to "
                         "continue it")
    return out_dir, {"config": config, "methods": {}}


@dataclass
class Setup:
    """What every method shares: the model's name and kind, its tokenizer, the loss and the encoded data."""
    name: str
    kind: str
    tokenizer: object
    loss_fn: PromptLoss
    splits: dict
    device: torch.device


def run(args):
    """Everything after argument checking: data, model, tokenizer and loss, then every method in turn."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    task = data.get_task(args.task, template=args.template, label_words=args.label_words)
    if args.data_dir is None:
        raw = data.builtin_splits(TINY["seed"])  # the splits the built-in corpus was generated to avoid
    else:
        raw = data.load_splits(args.data_dir, task, k=args.k, num_train=args.num_train, num_dev=args.num_dev,
                               num_test=args.num_test, data_seed=args.data_seed)
    out_dir, results = prepare_out_dir(args)
    name = builtin_model() if args.model == BUILTIN else args.model
    config = load_config(name, args.trust_remote_code)
    kind = model_kind(config)
    if "dizo" in args.methods or args.track_divergence:
        check_projectable(config, kind, args.trust_remote_code)
    tokenizer = load_tokenizer(name, args.trust_remote_code)
    # A prompt longer than the model's positions would index past its position table.
    max_length = min(MAX_LENGTH, getattr(config, "max_position_embeddings", MAX_LENGTH) - 2)
    loss_fn = PromptLoss(task, tokenizer, kind, device, max_length)
    splits = {s: loss_fn.encode(raw[s]) for s in ("train", "dev", "test")}
    print(f"model {args.model} ({kind} LM, {config.model_type}) on {device}, {args.dtype}; task {task.name}: "
          f"{len(splits['train'].labels)} train / {len(splits['dev'].labels)} dev / "
          f"{len(splits['test'].labels)} test")
    setup = Setup(name, kind, tokenizer, loss_fn, splits, device)
    restore_signals = Stop.install()
    try:
        return train_all(args, setup, out_dir, results)
    finally:
        restore_signals()


def train_all(args, setup, out_dir, results):
    """Train each method on a freshly loaded model (skipping those a resumed run finished); the exit code."""
    for method in args.methods:
        previous = results["methods"].get(method)
        if previous is not None and previous["status"] in ("done", "diverged"):
            continue  # a diverged run would diverge again: rerun it with other flags in a new out_dir
        model = load_model(setup.name, setup.kind, DTYPES[args.dtype], setup.device, args.trust_remote_code)
        resume_state = None
        if args.resume and previous is not None and previous["status"] in ("running", "interrupted"):
            resume_state = load_checkpoint(out_dir, method, model)

        def record(r, method=method):
            results["methods"][method] = r
            out_dir.mkdir(parents=True, exist_ok=True)
            write_json(out_dir / "results.json", results)

        r = train_method(method, model, setup.loss_fn, setup.splits, args, out_dir, resume_state, record)
        if Stop.signum is not None:
            r["status"] = "interrupted"
        record(r)
        if r["status"] == "diverged":
            kept = checkpoint_dir(out_dir, method)
            where = f"the last good checkpoint is in {kept}" if kept.exists() else "no checkpoint was reached"
            print(f"error: {method} diverged: {r['error']}; {where}", file=sys.stderr)
            return 1
        if Stop.signum is not None:
            print(f"interrupted at {method} step {r['steps']}: results and a checkpoint are in {out_dir}; "
                  f"continue with the same flags and --resume", file=sys.stderr)
            return 128 + Stop.signum
        if args.save:
            target = out_dir / "model" / method if len(args.methods) > 1 else out_dir / "model"
            target.parent.mkdir(parents=True, exist_ok=True)
            save_dir_atomically(target, lambda tmp: (model.save_pretrained(tmp),
                                                     setup.tokenizer.save_pretrained(tmp)))
        del model
        plot_curves(results, out_dir / "curves.png")
        if args.track_divergence:
            plot_divergence(results, out_dir / "divergence.png")
    print_table(results)
    print(f"results: {out_dir / 'results.json'}, plot: {out_dir / 'curves.png'}")
    return 0


def check_projectable(config, kind, trust_remote_code):
    """DiZO and --track_divergence need attention matrices projected_params can find: check on an empty
    model on the meta device (no memory, no weights read) before anything is trained or written."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    cls = AutoModelForCausalLM if kind == "causal" else AutoModelForMaskedLM
    with torch.device("meta"):
        model = cls.from_config(config, trust_remote_code=trust_remote_code)
    try:
        projected_params(model)
    except ValueError as e:
        raise UsageError(f"--method dizo / --track_divergence: {e}")


def load_checkpoint(out_dir, method, model):
    """Weights into `model` and the trainer state, from the method's last checkpoint."""
    from safetensors.torch import load_file

    folder = checkpoint_dir(out_dir, method)
    if not (folder / "trainer_state.pt").exists():
        return None
    weights = load_file(str(folder / "model.safetensors"), device=str(next(model.parameters()).device))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(not k.endswith("lm_head.weight") for k in missing):  # lm_head may be tied
        raise UsageError(f"checkpoint {folder} does not match the model: {missing[:3]} {unexpected[:3]}")
    model.tie_weights()
    return torch.load(folder / "trainer_state.pt", weights_only=True)


def main(argv=None):
    """Command-line entry point; returns the exit code (0 ok, 1 diverged, 2 bad input, 128+n signal n)."""
    transformers.utils.logging.disable_progress_bar()  # ours is the one that matters
    args = parse_args(argv)
    try:
        resolve_defaults(args)
        return run(args)
    except (UsageError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, keep the last checkpoint
        print("error: interrupted; the last checkpoint (if any) is kept, continue with --resume", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
