"""Reading and checking a run's settings: the command line built from train.Config's fields, --recipe, and the
refusals of settings that cannot work (one line, exit 2), before anything is loaded or written."""
import argparse
import math
import warnings
from dataclasses import field, fields

import torch

from dizo import DiZO, ZOSGD, projected_params
from runs import RANKS, first_line

METHODS = ("fo", "zo", "dizo")
BUILTIN = "builtin"  # --model value of the embedded tiny OPT
ROLES = ("q", "k", "v", "o")  # attention matrices whose divergence --track_divergence logs
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2, nothing written."""


# --recipe released: what the released DiZO code ran for OPT on SST-2 (its script, its logs' learning-rate
# decay, MeZO's 1000/500/1000 sampling); fp16 weights where there is a GPU, as its --load_float16. It leaves lr and
# steps unset: ZO's and DiZO's real-model defaults are its 1e-6 and MeZO's 20,000 (train.REAL_DEFAULTS); FO keeps its
# own (1e-5, 625), and the embedded model its own.
RECIPES = {"released": dict(trained="no_embed", lr_schedule="linear", eps=1e-3, batch_size=16, interval=50,
                            proj_iters=10, proj_eps=0.1, proj_lr=2.0, tau=0.2, eval_every=500, num_train=1000,
                            num_dev=500, num_test=1000)}


def flag(default, help, type=None):
    """A field of train.Config: its default, its --help text, and the type of a flag whose default is None."""
    return field(default=default, metadata={"help": help, "type": type})


def parse_config(config, argv=None, description=None):
    """A `config` (train.Config) from the command line, one flag per field, with --recipe's values as defaults."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(config):
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
    return config(**vars(args))


def dizo_roles(cfg, model):
    """What DiZO projects: K and V, as the released code; with --lora, every attention role whose matrices carry
    adapters (the released code projects every LoRA factor, and its adapters sit on Q and V)."""
    if not cfg.lora:
        return ("k", "v")
    roles = []
    for role in ROLES:
        with warnings.catch_warnings(record=True) as frozen:  # dizo.py warns of matrices without adapters
            warnings.simplefilter("always")
            try:
                found = projected_params(model, roles=(role,))
            except ValueError:  # no adapters on any matrix of this role
                continue
        if found and not frozen:
            roles.append(role)
    return tuple(roles) or ROLES  # none: projected_params(ROLES) then says what is wrong


def run_flags(cfg):
    """The settings a resumed run must share with the saved one."""
    skip = {"method", "out_dir", "save", "resume", "overwrite", "trust_remote_code"}
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in skip} | {
        "methods": list(cfg.methods), "world_size": RANKS.world,  # and the steps and lr run, defaults included:
        "steps_per_method": {m: cfg.steps_for(m) for m in cfg.methods},  # a default may change between versions
        "lr_per_method": {m: cfg.lr_for(m) for m in cfg.methods}}


def check_config(cfg):
    """Raise UsageError for a setting that cannot work, before anything is loaded or written."""
    choices = {"method": (*METHODS, "all"), "recipe": (None, *RECIPES), "trained": ("all", "no_embed"),
               "lr_schedule": ("constant", "linear"), "dtype": tuple(DTYPES)}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            names = ", ".join(a for a in allowed if a is not None)
            raise UsageError(f"--{name} must be one of {names}; got {getattr(cfg, name)!r}")
    if cfg.dtype == "fp16" and not torch.cuda.is_available():
        raise UsageError("--dtype fp16 needs a GPU: fp16 matmuls on the CPU are slow or unsupported; use fp32 or bf16")
    if cfg.half_weights and cfg.dtype in ("fp32", "fp64"):
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
        raise UsageError(f"--anchor_device must be a device this machine has, e.g. cpu ({first_line(e)})")
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
    if "fo" in cfg.methods and not 0 <= cfg.lr_for("fo") < math.inf:  # as ZOSGD checks its own, below
        raise UsageError(f"--lr must be finite and >= 0, got {cfg.lr_for('fo')}")
    dummy = torch.nn.Parameter(torch.zeros(2, 2))  # the optimizers check their own hyperparameters
    try:
        for method in [m for m in cfg.methods if m != "fo"]:
            if method == "zo":
                ZOSGD([dummy], **cfg.zo_settings(method))
            else:
                DiZO([dummy], [("dummy", dummy)], **cfg.zo_settings(method))
    except ValueError as e:
        raise UsageError(f"--{e}")


def check_model(cfg, model, setup):
    """What the loaded model and data must allow, before anything is written: a batch the training set can fill,
    the data's token ids, DiZO's matrices, an ε that moves θ."""
    if cfg.batch_size > (n_train := len(setup.splits["train"].labels)):  # a batch would hold every example once
        raise UsageError(f"--batch_size {cfg.batch_size} is larger than the {n_train} training examples; give at "
                         f"most {n_train}")
    loss_fn = setup.loss_fn  # an id past the embedding's rows would be an IndexError in the middle of a run
    top = max([max(p) for enc in setup.splits.values() for p in enc.prompts] + [max(w) for w in loss_fn.words])
    if max(top, loss_fn.pad or 0) >= (rows := model.get_input_embeddings().weight.shape[0]):
        raise UsageError(f"--model {cfg.model}: the data's token ids reach {max(top, loss_fn.pad or 0)}, its embedding "
                         f"has {rows} rows: a tokenizer and a model that do not belong together")
    if "dizo" in cfg.methods:
        try:
            projected_params(model, roles=dizo_roles(cfg, model))
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
    if "dizo" in cfg.methods and 0 < cfg.steps_for("dizo") < cfg.interval:  # it would be zo under dizo's name
        raise UsageError(f"--method dizo projects every --interval {cfg.interval} steps, and --steps "
                         f"{cfg.steps_for('dizo')} ends before the first: give more steps or a smaller --interval")
