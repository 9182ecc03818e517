"""Experiments on fine-tuning runs: the paired zo/dizo study, the ablation of a saved model, a run's figures redrawn.

    python studies.py --paired runs/paired                 # 3 settings x 2 methods x 5-6 rates x 5 seeds, 2 at a time
    python studies.py --paired runs/paired --summary-only  # the tables and DIR/paired.png of the runs there alone
    python studies.py --ablate runs/abl/zo/model --out runs/abl/zo.json   # one parameter group reverted at a time
    python studies.py --replot runs/zo                     # train.py's figures of runs/zo, from its results.json

--paired runs train.py once per setting, method, rate and seed (a run already done is kept), then prints dev loss and
test accuracy per rate, dizo - zo paired by seed, and DiZO's phases. --ablate loads the fine-tuned model (train.py
--save), the model it started from (--base) and the dev split as train.py does (--task, --data_dir, ...), and writes
the dev loss and accuracy with each parameter group reverted to --out (JSON) and its figure beside it (.png)."""

import argparse
import contextlib
import json
import math
import os
import re
import statistics
import sys
from dataclasses import fields
from pathlib import Path

import torch

import bench
import data
import plots
import train
from dizo import projected_params


# -------------------------------------------------------------------------------------------- paired study
def mean_std(values):
    """'mean ± std' of a non-empty list, both to the std's second significant digit."""
    mean, std = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
    if std <= 1e-12 * abs(mean):  # equal but for rounding
        return f"{mean:.4g} ± 0"
    digits = max(0, 1 - math.floor(math.log10(std)))  # both to the std's second significant digit
    return f"{mean:.{digits}f} ± {std:.{digits}f}"

# zo against dizo over seeds at equal forward passes (zo takes DiZO's passes / 2 steps, each method its own full
# rate schedule) over a rate sweep: the same rate for both (the paper's protocol), and each at the rate that
# gives it the lowest mean dev loss (the fair comparison). PAIRED[setting] = (train.py flags, DiZO steps, lr, the
# rates tried as multiples of lr: both sides of the best, finer near it).
PAIRED = {"full": ((), 1500, 1.5e-4, (0.25, 0.5, 1, 2 ** 0.5, 2, 4)),  # the quick start's, longer: K, V of every layer
          "lora-kv": (("--lora", "8", "--lora_targets", "k_proj,v_proj"), 600, 3e-3,  # every trained param projected
                      (1, 2 ** 0.5, 2, 2 ** 1.5, 4)),
          "lora-qv": (("--lora", "8"), 600, 3e-3, (1, 2 ** 0.5, 2, 2 ** 1.5, 4))}  # the released LoRA placement


def paired_runs(folder, seeds):
    """{run folder: train.py command} of every run of the study (κ = 50, M = 10: a phase costs 22 passes)."""
    found = {}
    for setting, (flags, steps, lr, rates) in PAIRED.items():
        for method, n in (("zo", steps + 11 * (steps // 50)), ("dizo", steps)):
            for rate, seed in ((f"{lr * x:.3g}", seed) for x in rates for seed in seeds):
                found[Path(folder) / f"{setting}-{method}-lr{rate}-s{seed}"] = [
                    sys.executable, "train.py", "--method", method, "--steps", str(n), "--lr", rate, "--seed",
                    str(seed), *flags, "--eval_every", "100", "--overwrite", "--out_dir"]
    return found


def run_paired(folder, seeds, jobs):
    """Every run of the study not yet done, `jobs` at a time (each with cores / jobs threads); a run that fails
    is reported (its log kept in folder/logs/) and left out of the summary."""
    import concurrent.futures
    import subprocess
    from tqdm import tqdm
    todo = [(out, cmd) for out, cmd in paired_runs(folder, seeds).items() if not _paired_result(out)]
    (Path(folder) / "logs").mkdir(parents=True, exist_ok=True)
    env = os.environ | {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}

    def one(out, cmd):
        with open(Path(folder) / "logs" / f"{out.name}.log", "w") as log:
            return out, subprocess.run(cmd + [str(out)], stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        for out, rc in tqdm(pool.map(lambda t: one(*t), todo), total=len(todo), desc="paired runs"):
            if rc != 0:
                print(f"{out.name}: exit {rc}, see {folder}/logs/{out.name}.log", file=sys.stderr)


def _paired_result(out):
    """The finished result of one study run, or None; a results.json that is not a train.py run's is one line."""
    path = Path(out) / "results.json"
    try:
        text = path.read_text()
    except OSError:  # not run yet
        return None
    try:
        r = next(iter(json.loads(text)["methods"].values()), None)
        return r if r is not None and r["status"] == "done" else None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        sys.exit(f"error: {path} is not a train.py run's results ({type(e).__name__}: {e}); remove {out} to run it "
                 "again")


def paired_summary(folder, plot, seeds=None):
    """Markdown tables over the study's finished runs of `seeds` (default all): per rate, dev loss and test accuracy
    (mean ± std over seeds); per seed, dizo - zo at the same rate and at each one's best; DiZO's phases (ranges over
    seeds; held-out: dev examples). The figure: final dev loss against the rate, per setting."""
    done = {}  # setting -> method -> lr -> {seed: result}
    for path in sorted(Path(folder).glob("*/results.json")):  # <setting>-<method>-lr<lr>-s<seed>; lr may be 7.5e-05
        name = re.fullmatch(r"(.+)-(fo|zo|dizo)-lr(.+?)-s(\d+)", path.parent.name)
        if name and (r := _paired_result(path.parent)) and (seeds is None or int(name[4]) in seeds):
            done.setdefault(name[1], {}).setdefault(name[2], {}).setdefault(float(name[3]), {})[int(name[4])] = r
    if not done:  # e.g. a folder of other runs
        sys.exit(f"no finished runs in {folder}/<setting>-<method>-lr<lr>-s<seed>/results.json")
    fig, axes = plots.pyplot().subplots(1, len(done), figsize=(4.5 * len(done), 3.6), squeeze=False)
    for (setting, methods), ax in zip(done.items(), axes[0]):
        mean = {m: {lr: statistics.mean(r["dev_loss"] for r in by.values()) for lr, by in rates.items()}
                for m, rates in methods.items()}
        best = {m: min(means, key=means.get) for m, means in mean.items()}
        print(f"\n#### {setting}\n\n| method | lr | seeds | fwd passes | final dev loss | test acc |\n"
              f"|---|---:|---:|---:|---:|---:|")
        for m, rates in sorted(methods.items(), reverse=True):  # zo, then dizo
            for lr, by in sorted(rates.items()):
                passes = sorted({r["forward_passes"] for r in by.values()})
                print(f"| {m} | {lr:g}{' (best)' if lr == best[m] else ''} | {len(by)} | "
                      f"{'/'.join(map(str, passes))} | {mean_std([r['dev_loss'] for r in by.values()])} | "
                      f"{mean_std([r['test_acc'] for r in by.values()])} |")
            ax.errorbar(sorted(rates), [mean[m][lr] for lr in sorted(rates)], marker="o", capsize=3, label=m,
                        color={"zo": "tab:orange", "dizo": "tab:green"}.get(m),  # as in curves.png
                        yerr=[statistics.stdev(v) if len(v := [r["dev_loss"] for r in rates[lr].values()]) > 1 else 0
                              for lr in sorted(rates)])
        if set(methods) == {"zo", "dizo"}:
            print("\n| dizo - zo, paired by seed | seeds | dev loss | dizo lower in | test acc |\n|---|---:|---:|---:|---:|")
            same = [("same rate", lr, lr) for lr in sorted(set(methods["zo"]) & set(methods["dizo"]))]
            for name, lz, ld in same + [("each at its best rate", best["zo"], best["dizo"])]:
                common = sorted(set(methods["zo"].get(lz, {})) & set(methods["dizo"].get(ld, {})))
                pairs = [(methods["zo"][lz][s], methods["dizo"][ld][s]) for s in common]
                diff = {k: [d[k] - z[k] for z, d in pairs] for k in ("dev_loss", "test_acc")}
                print(f"| {name} (zo {lz:g}, dizo {ld:g}) | {len(pairs)} | {mean_std(diff['dev_loss'])} | "
                      f"{sum(x < 0 for x in diff['dev_loss'])}/{len(pairs)} | {mean_std(diff['test_acc'])} |")
        dizo = {lr: [[p for p in r["projection"] if "dev_loss_before" in p] for r in by.values()]
                for lr, by in methods.get("dizo", {}).items()}  # per rate, per seed: phases measured on dev
        if any(ps for per in dizo.values() for ps in per):
            print("\n| dizo's phases, lr | seeds | phases | held-out dev loss lower after | first search batch lower "
                  "after | held-out change, median | correlation | max abs(r - 1), 2nd half |\n|---|---:|---:|---:|---:|"
                  "---:|---:|---:|")
            span = lambda xs, f="{}": "–".join(dict.fromkeys(f.format(x) for x in (min(xs), max(xs))))  # noqa: E731
            for lr, per in sorted(dizo.items()):
                held = [[p["dev_loss_after"] / p["dev_loss_before"] - 1 for p in ps] for ps in per]
                search = [[p["loss_after"] / p["loss_before"] - 1 for p in ps] for ps in per]
                with contextlib.suppress(statistics.StatisticsError):  # too few phases, or one side constant
                    corr = "undefined"
                    corr = f"{statistics.correlation(sum(held, []), sum(search, [])):.2f}"  # all phases of this rate
                print(f"| {lr:g} | {len(per)} | {span([len(ps) for ps in per])} | "
                      f"{span([sum(x < 0 for x in h) for h in held])} | {span([sum(x < 0 for x in s) for s in search])}"
                      f" | {span([100 * statistics.median(h) for h in held], '{:+.2f}%')} | {corr} | "
                      f"{span([max(abs(x - 1) for p in ps[len(ps) // 2:] for x in p['ratios']) for ps in per], '{:.2f}')} |")
        lrs = sorted({lr for rates in methods.values() for lr in rates})  # labelled: the rates tried, no others
        ax.set(xscale="log", yscale="log", xlabel="learning rate", ylabel="final dev loss (mean ± std over seeds)",
               title=f"{setting}: equal forward passes", xticks=lrs, xticklabels=[f"{x:.3g}" for x in lrs])
        ax.xaxis.set_minor_formatter("")
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    plots.save_figure(fig, Path(plot))
    print(f"\nwrote {plot}")


# ------------------------------------------------------------------------------------------------- ablation
# Where a fine-tuning lives: dev loss and accuracy with one parameter group put back to pretrained, and along
# θ0 + r·Δ for K and V. If reverting K and V costs little, no projection of them can change much on that task.

ABLATION_RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)  # r of θ0 + r·Δ; DiZO's ratios stay in [1-τ, 1+τ]
ABLATION_LINES = {"K+V": ("k", "v"), "K": ("k",), "V": ("v",)}  # the projected matrices, together and apart
# --ablate reads the task and the dev split as train.py does, with train.py's own flags
ABLATION_DATA_FLAGS = ("task", "data_dir", "k", "num_train", "num_dev", "num_test", "data_seed", "template",
                       "label_words", "trust_remote_code")


def parameter_groups(model: torch.nn.Module) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """Every parameter of a transformer LM in exactly one group, found by module structure, as (name, tensor):
        embeddings/head   model.get_input_embeddings() and get_output_embeddings() (one tensor when tied)
        q, k, v, o        the attention matrices, as projected_params finds them (views of a fused weight)
        norms             LayerNorm / RMSNorm modules (see _is_norm), anywhere in the model
        attention biases  the rest of each attention block (its smallest module holding Q and O)
        mlp               the rest of each transformer layer (a child of an nn.ModuleList holding Q)
        other             the rest of the model (learned positions, projections outside the layers)
    Empty groups are left out. A fused Q|K|V weight is covered by its three views, not listed itself."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups, taken = {}, set()

    def _base_id(t):
        return id(t if t._base is None else t._base)

    def _is_norm(module):  # LayerNorm, RMSNorm and their copies: own parameters a vector weight, maybe a bias
        own = dict(module.named_parameters(recurse=False))
        return set(own) in ({"weight"}, {"weight", "bias"}) and all(p.dim() == 1 for p in own.values())

    def add(group, pairs):
        fresh = [(n, t) for n, t in pairs if id(t) not in taken]
        taken.update(i for _, t in fresh for i in (id(t), _base_id(t)))
        if fresh:
            groups.setdefault(group, []).extend(fresh)

    def parameters(module):
        return [(names[id(p)], p) for p in module.parameters()]

    def holds(module, ids):
        return bool({id(p) for p in module.parameters()} & ids)

    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            add("embeddings/head", parameters(module))
    for role in ("q", "k", "v", "o"):
        add(role, projected_params(model, roles=(role,)))
    add("norms", [pair for m in model.modules() if _is_norm(m) for pair in parameters(m)])
    queries, outputs = ({_base_id(t) for _, t in groups[role]} for role in ("q", "o"))
    layers = [layer for stack in model.modules() if isinstance(stack, torch.nn.ModuleList) for layer in stack
              if holds(layer, queries)]
    attention = [min((m for m in layer.modules() if holds(m, queries) and holds(m, outputs)),
                     key=lambda m: sum(1 for _ in m.parameters())) for layer in layers]
    add("attention biases", [pair for module in attention for pair in parameters(module)])
    add("mlp", [pair for layer in layers for pair in parameters(layer)])
    add("other", parameters(model))
    return groups


def matched_groups(finetuned, pretrained) -> dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """{group: (fine-tuned tensors, pretrained counterparts)}; DataError if parameter names or shapes differ."""
    ours, theirs = parameter_groups(finetuned), parameter_groups(pretrained)
    shapes = [{g: [(n, tuple(t.shape)) for n, t in pairs] for g, pairs in groups.items()} for groups in (ours, theirs)]
    if shapes[0] != shapes[1]:
        raise data.DataError("the fine-tuned and the pretrained model have different parameters (names or shapes): "
                             "--base must be the model the fine-tuning started from")
    return {g: ([t for _, t in ours[g]], [t for _, t in theirs[g]]) for g in ours}


def measured_with(tensors, values, measure):
    """measure() while `tensors` hold `values` (copied in); their own values are put back after, bit for bit."""
    saved = [t.detach().clone() for t in tensors]
    try:
        for t, v in zip(tensors, values):
            t.detach().copy_(v.detach())  # detached: into the same memory, a copy autograd does not record
        return measure()
    finally:
        for t, v in zip(tensors, saved):
            t.detach().copy_(v)


def split_metrics(model, loss_fn, enc):
    """The prompt loss (as PromptLoss.loss) and the accuracy on an encoded split."""
    correct, total = loss_fn.score(model, enc, range(len(enc.labels)))
    return {"loss": total / len(enc.labels), "acc": correct / len(enc.labels)}


def ablation(finetuned, pretrained, measure) -> dict:
    """measure(model) -> {"loss", "acc"} of both models, of the fine-tuned one with each group alone reverted,
    and along θ0 + r·Δ for K and V, together and apart; the fine-tuned model is left as it was."""
    pairs = matched_groups(finetuned, pretrained)
    ft, pre = measure(finetuned), measure(pretrained)

    def share_lost(loss):  # (loss - loss_ft) / (loss_pre - loss_ft): the share of the gain given back; None if no gain
        return (loss - ft["loss"]) / (pre["loss"] - ft["loss"]) if pre["loss"] > ft["loss"] else None

    groups = {}
    for name, (tensors, values) in pairs.items():
        m = measured_with(tensors, values, lambda: measure(finetuned))
        groups[name] = m | {"params": sum(t.numel() for t in tensors), "share_lost": share_lost(m["loss"])}
    lines = {}
    for line, roles in ABLATION_LINES.items():  # θ0 + r (θ - θ0) by torch.lerp as DiZO projects: exact at r = 0, 1
        tensors = [t for role in roles for t in pairs[role][0]]
        starts = [t for role in roles for t in pairs[role][1]]
        lines[line] = [measured_with(tensors, [torch.lerp(a, b, r) for a, b in zip(starts, tensors)],
                                     lambda: measure(finetuned)) for r in ABLATION_RATIOS]
    kv_reverted = lines["K+V"][ABLATION_RATIOS.index(0.0)]
    return {"finetuned": ft, "pretrained": pre, "groups": groups, "ratios": list(ABLATION_RATIOS),
            "lines": lines, "kv_share_lost": share_lost(kv_reverted["loss"])}


def ablation_tables(result):
    """Markdown: dev loss and accuracy per reverted group; dev loss along θ0 + r·Δ."""
    ft, pre, lines, share = result["finetuned"], result["pretrained"], result["lines"], result["kv_share_lost"]
    out = ["| model | params | dev loss | dev acc | share of the loss gain lost |", "|---|---:|---:|---:|---:|",
           f"| fine-tuned | | {ft['loss']:.4f} | {ft['acc']:.3f} | 0 |",
           f"| pretrained | | {pre['loss']:.4f} | {pre['acc']:.3f} | 1 |"]
    for name, g in result["groups"].items():
        lost = "-" if g["share_lost"] is None else f"{g['share_lost']:.3f}"
        out.append(f"| {name} reverted | {g['params']:,} | {g['loss']:.4f} | {g['acc']:.3f} | {lost} |")
    out += ["", "dev loss with the projected matrices at θ0 + r·Δ (r = 1: fine-tuned, r = 0: reverted)\n",
            "| r | " + " | ".join(lines) + " |", "|---:|" + "---:|" * len(lines)]
    for i, r in enumerate(result["ratios"]):
        out.append(f"| {r:g} | " + " | ".join(f"{ms[i]['loss']:.4f}" for ms in lines.values()) + " |")
    out.append("\nshare of the fine-tuning's dev-loss gain lost when K and V are reverted: "
               + ("- (the fine-tuning did not lower the dev loss)" if share is None else f"{share:.3f}"))
    return "\n".join(out)


def plot_ablation(result, path):
    """Dev loss per reverted group against the fine-tuned and pretrained losses; dev loss along θ0 + r·Δ."""
    fig, (ax_groups, ax_lines) = plots.pyplot().subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    names = list(result["groups"])
    ax_groups.bar(names, [result["groups"][n]["loss"] for n in names], color="tab:blue")
    for key, label, style in (("finetuned", "fine-tuned", "-"), ("pretrained", "pretrained", "--")):
        ax_groups.axhline(result[key]["loss"], color="gray", ls=style, lw=1, label=label)
    ax_groups.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax_groups.set(ylabel="dev loss", title="one group reverted to pretrained")
    for line, ms in result["lines"].items():
        ax_lines.plot(result["ratios"], [m["loss"] for m in ms], marker="o", label=line)
    ax_lines.axvline(1.0, color="gray", lw=0.8)
    ax_lines.set(xlabel="r", ylabel="dev loss", title="projected matrices at θ0 + r·Δ")
    for ax in (ax_groups, ax_lines):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    plots.save_figure(fig, Path(path))


def ablate_main(args):
    """--ablate: load both models and the dev split as train.py does, measure, print, write JSON and a figure."""
    cfg = train.Config(model=args.ablate, method="fo", dtype=args.dtype,  # fo: no DiZO check, ours comes below
                       **{name: getattr(args, name) for name in ABLATION_DATA_FLAGS})
    try:
        if (Path(args.ablate) / "results.json").exists() and not (Path(args.ablate) / "config.json").exists():
            raise data.DataError(f"--ablate {args.ablate} is a train.py run's folder; pass the model it saved with "
                                 f"--save: {Path(args.ablate) / 'model'} (or model/<method>)")
        train.check_config(cfg)
        setup = train.prepare(cfg)
        base = data.builtin_model() if args.base == train.BUILTIN else args.base
        if data.load_tokenizer(base, cfg.trust_remote_code).get_vocab() != setup.tokenizer.get_vocab():
            raise data.DataError(f"--base {args.base}: its tokenizer differs from the fine-tuned model's; "
                                 "give the model the fine-tuning started from")
        models = [data.load_model(name, setup.kind, train.DTYPES[args.dtype], setup.device, cfg.trust_remote_code)
                  for name in (setup.name, base)]
        result = ablation(*models, lambda m: split_metrics(m, setup.loss_fn, setup.splits["dev"]))
    except (train.UsageError, data.DataError, ValueError) as e:
        sys.exit(f"error: {e}")
    dev = len(setup.splits["dev"].labels)
    print(f"\n{args.ablate} against {args.base}, task {setup.loss_fn.task.name}, {dev} dev examples, {args.dtype}\n")
    print(ablation_tables(result))
    bench.write_json(args.out, {"finetuned_model": args.ablate, "base": args.base, "task": setup.loss_fn.task.name,
                                "dev_examples": dev, **result})
    plot_ablation(result, Path(args.out).with_suffix(".png"))
    print(f"wrote {Path(args.out).with_suffix('.png')}")


# ------------------------------------------------------------------------------------------ a run's figures
def replot(folder):
    """Draw the figures train.py draws for the run in `folder` (plots.plot_run), from its results.json alone."""
    try:
        drawn = plots.plot_run(json.loads((folder / "results.json").read_text()), folder)
    except OSError as e:  # no results.json, or a folder where the figures cannot be written
        raise SystemExit(f"error: cannot read or write in {folder} ({e.strerror or e}: {e.filename})")
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise SystemExit(f"error: {folder} holds no readable train.py results.json with a history to draw "
                         f"({type(e).__name__}: {e})")
    print(f"drew {', '.join(drawn)} in {folder}")


# --------------------------------------------------------------------------------------------- command line
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paired", metavar="DIR",
                   help="run the paired zo/dizo study's missing runs into DIR, then summarise")
    p.add_argument("--seeds", default=[0, 1, 2, 3, 4], type=lambda s: [int(x) for x in s.split(",")],
                   help="--paired: comma-separated seeds (default 0,1,2,3,4)")
    p.add_argument("--jobs", type=int, default=2, help="--paired: runs at a time")
    p.add_argument("--summary-only", action="store_true", help="--paired: summarise the runs there, run nothing")
    p.add_argument("--plot", help="--paired: the figure (default DIR/paired.png)")
    p.add_argument("--replot", metavar="DIR", help="redraw a train.py run's figures in DIR from its results.json")
    p.add_argument("--ablate", metavar="FOLDER", help="revert one parameter group at a time of this fine-tuned model "
                   "folder (train.py --save) and report the dev loss and accuracy")
    p.add_argument("--base", default=train.BUILTIN,
                   help="--ablate: the pretrained model it started from ('builtin' = the embedded tiny OPT)")
    p.add_argument("--dtype", default="fp32", choices=tuple(train.DTYPES) + tuple(bench.AUTOCAST),
                   help="--ablate: the dtype both models are loaded in (train.py's --dtype)")
    p.add_argument("--out", help="--ablate: the JSON report (default runs/ablation.json); the figure: its name, .png")
    for f in (f for f in fields(train.Config) if f.name in ABLATION_DATA_FLAGS):  # train.py's, same help
        kind = dict(action="store_true") if f.default is False else dict(
            default=f.default, type=f.metadata["type"] or type(f.default))
        p.add_argument(f"--{f.name}", help=f"--ablate: {f.metadata['help']}", **kind)
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    if (args.paired, args.replot, args.ablate) == (None, None, None):
        p.error("give one of --paired, --ablate, --replot")
    args.out = args.out or "runs/ablation.json"
    if args.ablate and Path(args.out).suffix != ".json":  # the figure goes beside it, under the same name
        p.error(f"--out {args.out}: the ablation's JSON report ends in .json (the figure is written beside it as .png)")
    outs = [Path(args.paired) / "logs", *([args.plot] if args.plot else [])] if args.paired else [] if args.replot \
        else [args.out, Path(args.out).with_suffix(".png")]
    for out in outs:  # the outputs of this command, checked before the work
        bench.check_output(out)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.paired is not None:
        if not args.summary_only:
            run_paired(args.paired, args.seeds, args.jobs)
        return paired_summary(args.paired, args.plot or Path(args.paired) / "paired.png", args.seeds)
    if args.replot is not None:
        return replot(Path(args.replot))
    return ablate_main(args)


if __name__ == "__main__":
    main()
