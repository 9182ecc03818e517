"""Tests of bench.py's studies: --paired (the rate picked on dev, seeds paired), --precision (its replay of z),
--ablate (where a fine-tuning lives), --replot, and that none of them overwrites a train.py run. CPU only, no
network. The tiny models come from test_dizo.py, the saved model folders and train.py runs from test_train.py.
"""

import copy
import json
import shutil
import sys
import warnings

import pytest
import torch

import bench
import runs
import data
import studies
from dizo import projected_params
from test_dizo import tiny_model
from test_train import _no_figures, assets, figures, run_train  # noqa: F401 (fixtures: used by name)

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------
# studies.py --paired: each method at its best rate on dev, the seeds paired

def fake_paired_run(folder, setting, method, lr, seed, dev_loss, test_acc):
    out = folder / f"{setting}-{method}-lr{lr:g}-s{seed}"
    out.mkdir(parents=True)
    phases = [{"loss_before": 1.0, "loss_after": 0.9, "dev_loss_before": 1.0, "dev_loss_after": x, "ratios": [1.1, 0.95]}
              for x in (0.99, 1.02)]
    r = {"status": "done", "dev_loss": dev_loss, "test_acc": test_acc, "forward_passes": 100,
         "projection": phases if method == "dizo" else []}
    (out / "results.json").write_text(json.dumps({"methods": {method: r}}))


def test_paired_study_picks_each_rate_on_dev_and_pairs_the_seeds(tmp_path, capsys):
    # zo: lr 1 mean dev loss 0.5, lr 2 mean 0.3 (best); dizo: lr 1 mean 0.4 (best), lr 2 mean 0.45
    table = {("zo", 1): [0.5, 0.6, 0.4], ("zo", 2): [0.3, 0.35, 0.25], ("dizo", 1): [0.4, 0.5, 0.3],
             ("dizo", 2): [0.45, 0.5, 0.4]}
    for (method, lr), losses in table.items():
        for seed, loss in enumerate(losses):
            fake_paired_run(tmp_path, "full", method, lr, seed, loss, 1 - loss)
    fake_paired_run(tmp_path, "full", "zo", 1, 7, 0.0, 1.0)  # a seed not asked for: left out
    fake_paired_run(tmp_path, "full", "zo", 7.5e-5, 0, 0.9, 0.5)  # an lr with an exponent in the folder's name
    studies.paired_summary(tmp_path, tmp_path / "paired.png", seeds=[0, 1, 2])
    out = capsys.readouterr().out
    assert "| zo | 2 (best) | 3 | 100 | 0.300 ± 0.050 |" in out and "| dizo | 1 (best) |" in out
    assert "| zo | 7.5e-05 | 1 | 100 | 0.9 ± 0 | 0.5 ± 0 |" in out
    same = [d - z for d, z in zip(table["dizo", 1], table["zo", 1])]  # -0.1 in every seed
    best = [d - z for d, z in zip(table["dizo", 1], table["zo", 2])]  # +0.1, +0.15, +0.05
    assert "| same rate (zo 1, dizo 1) | 3 | -0.1 ± 0 | 3/3 |" in out and studies.mean_std(same) == "-0.1 ± 0"
    assert "| same rate (zo 2, dizo 2) | 3 | 0.15 ± 0 | 0/3 |" in out  # every rate both ran
    assert f"| each at its best rate (zo 2, dizo 1) | 3 | {studies.mean_std(best)} | 0/3 |" in out
    # per seed two phases measured on dev, one lower (-1%), one higher (+2%); the search batch lower in both
    assert "| 1 | 3 | 2 | 1 | 2 | +0.50% | undefined | 0.10 |" in out
    assert (tmp_path / "paired.png").stat().st_size > 1000


def test_paired_runs_give_zo_the_forward_passes_of_dizo(assets, tmp_path):
    commands = studies.paired_runs(tmp_path, [0]).values()
    steps = {(c[c.index("--method") + 1], c[c.index("--steps") + 1]) for c in commands}
    assert {("zo", "1830"), ("dizo", "1500"), ("zo", "732"), ("dizo", "600")} == steps
    rates = {c[c.index("--lr") + 1] for c in commands if "--lora" not in c}
    assert rates == {"3.75e-05", "7.5e-05", "0.00015", "0.000212", "0.0003", "0.0006"}  # the runs' folder names
    for method, n in (("zo", "61"), ("dizo", "50")):  # κ = 50, M = 10: 2·50 + (2·10 + 2) = 122 = 2·61
        assert run_train(assets, tmp_path / method, "--method", method, "--steps", n, "--interval", "50",
                         "--proj_iters", "10", "--phase_dev", "0", "--eval_every", n) == 0
    passes = [json.loads((tmp_path / m / "results.json").read_text())["methods"][m]["forward_passes"]
              for m in ("zo", "dizo")]
    assert passes == [122, 122]


# ---------------------------------------------------------------------------------------------------------
# bench.py never overwrites a train.py run, and fails before its work

@pytest.fixture(scope="module")
def finished_run(assets, tmp_path_factory):
    """A finished train.py run (zo, one step) with its figures: set up before the function-scoped _no_figures,
    so they are drawn. The cases below each work on a copy."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert run_train(assets, out, "--method", "zo", "--steps", "1") == 0
    assert (out / "curves.png").stat().st_size > 1000
    return out


@pytest.mark.parametrize("case, message", [
    ("ablate_onto_results", "would replace a file of the train.py run"),
    ("ablate_figure_onto_curves", "would replace a file of the train.py run"),
    ("ablate_into_checkpoints", "would replace a file of the train.py run"),
    ("out_under_a_file", "cannot write"),
    ("paired_into_a_file", "cannot write"),
    ("replot_without_history", "results.json with a history to draw"),
    ("replot_read_only", "cannot read or write in"),
])
def test_bench_never_overwrites_a_run_and_fails_before_its_work(finished_run, tmp_path, monkeypatch, case, message,
                                                                figures):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    target = {"ablate_onto_results": out / "results.json", "ablate_figure_onto_curves": out / "curves.json",
              "ablate_into_checkpoints": out / "checkpoints" / "a.json", "out_under_a_file": tmp_path / "a_file" / "x.json"}
    (tmp_path / "a_file").write_text("")
    if case.startswith("replot"):
        if case == "replot_without_history":
            (out / "results.json").write_text(json.dumps({"format": runs.FORMAT, "methods": {"zo": {"status": "done"}}}))
            before.pop(out / "results.json")
        else:  # as a read-only folder does to root too
            monkeypatch.setattr(runs.os, "replace", lambda a, b: (_ for _ in ()).throw(PermissionError(13, "denied")))
        argv = ["--replot", str(out)]
    elif case == "paired_into_a_file":  # the study's folder is a file: refused before any run starts
        argv = ["--paired", str(tmp_path / "a_file")]
    else:
        argv = ["--ablate", "anything: the outputs are checked first", "--out", str(target[case])]
    with pytest.raises(SystemExit) as e:
        studies.main(argv)
    assert str(e.value.code).startswith("error: ") and message in str(e.value.code), e.value.code
    assert all(p.read_bytes() == b for p, b in before.items())


# ---------------------------------------------------------------------------------------------------------
# bench.py --precision: its replay of z must be the optimizer's, or every fidelity it reports is noise

def test_precision_study_replays_the_optimizers_z():
    """The fidelity study's layer (512 x 512 matrices): with fp32 weights, alone or under bf16 autocast, the update
    it measures is the intended -ηgz (ratio 1, cosine 1); bf16 weights stepped in place are not."""
    found = {}
    for prec in bench.half_precisions(("bf16",)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bf16 weights stepped in place warn by design
            found[prec.name] = bench.step_fidelity(prec, 0.05, 1e-6, 1e-3, torch.device("cpu"))["update"]
    for name in ("fp32", "bf16 autocast"):
        assert found[name]["ratio"] == pytest.approx(1, abs=1e-3) and found[name]["cosine"] > 0.999, name
    assert found["bf16 plain"]["cosine"] < 0.5


# ---------------------------------------------------------------------------------------------------------
# studies.py --ablate: where a fine-tuning lives

@pytest.mark.parametrize("family", ["opt", "roberta", "llama", "gpt2"])
def test_parameter_groups_cover_every_parameter_exactly_once(family):
    model = tiny_model(family)
    groups = studies.parameter_groups(model)
    with torch.no_grad():  # mark every element through the groups' tensors (views of fused weights included)
        for p in model.parameters():
            p.zero_()
        for pairs in groups.values():
            for _, t in pairs:
                t.add_(1)
    assert all(bool((p == 1).all()) for p in model.parameters())
    for role in ("q", "k", "v", "o"):
        assert [n for n, _ in groups[role]] == [n for n, _ in projected_params(model, roles=(role,))]
    norms = {f"{m}.{n}" if m else n for m, module in model.named_modules() if type(module).__name__.endswith("Norm")
             for n, _ in module.named_parameters(recurse=False)}
    assert {n for n, _ in groups["norms"]} == norms
    embedding = model.get_input_embeddings().weight
    assert any(t is embedding for _, t in groups["embeddings/head"])


def test_parameter_groups_of_opt_by_name():
    """Against OPT's own parameter names: the rest of a layer is its MLP, fc1 and fc2."""
    groups = studies.parameter_groups(tiny_model("opt"))
    names = {g: {n for n, _ in pairs} for g, pairs in groups.items()}
    layer = "model.decoder.layers.1."
    assert {n for n in names["mlp"] if n.startswith(layer)} == {layer + f"fc{i}.{w}" for i in (1, 2)
                                                                  for w in ("weight", "bias")}
    assert {n for n in names["attention biases"] if n.startswith(layer)} == {
        layer + f"self_attn.{m}.bias" for m in ("q_proj", "k_proj", "v_proj", "out_proj")}
    assert names["embeddings/head"] == {"model.decoder.embed_tokens.weight"}  # the head is tied to it
    assert names["other"] == {"model.decoder.embed_positions.weight"}


@pytest.fixture
def ablation_pair(assets):
    """The tiny causal OPT (pretrained), a copy fine-tuned by a few AdamW steps on the dev split (so that its
    dev loss is lower), and the dev split's measure."""
    task = data.get_task("sst-2")
    tok = data.load_tokenizer(assets["causal"], False)
    loss_fn = data.PromptLoss(task, tok, "causal", torch.device("cpu"))
    dev = loss_fn.encode(data.load_splits(assets["data"], task)["dev"])
    pre = data.load_model(assets["causal"], "causal", torch.float32, "cpu", False)
    ft = copy.deepcopy(pre)
    opt = torch.optim.AdamW(ft.parameters(), lr=1e-2)
    for _ in range(10):
        opt.zero_grad()
        loss_fn.loss(ft, dev, list(range(len(dev.labels)))).backward()
        opt.step()
    return pre, ft.eval(), lambda model: studies.split_metrics(model, loss_fn, dev), loss_fn, dev


def with_matrices_from(model, source, roles):
    """A copy of `model` with the weights of OPT's <role>_proj modules copied from `source` by name."""
    names = tuple(f"self_attn.{role}_proj.weight" for role in roles)
    copied = copy.deepcopy(model)
    state = source.state_dict()
    copied.load_state_dict({n: state[n] if n.endswith(names) else t for n, t in copied.state_dict().items()})
    return copied


def test_split_metrics_are_the_prompt_loss_and_the_accuracy(ablation_pair):
    _, ft, measure, loss_fn, dev = ablation_pair
    m = measure(ft)
    with torch.no_grad():
        reference = float(loss_fn.loss(ft, dev, list(range(len(dev.labels)))))  # one batch: the mean over all
    assert m["loss"] == pytest.approx(reference, rel=1e-6)
    with torch.no_grad():
        scores = loss_fn.scores(ft, dev.prompts)
    assert m["acc"] == float((scores.argmax(1) == torch.tensor(dev.labels)).double().mean())


def test_reverting_every_group_gives_the_pretrained_model_and_leaves_the_model_as_it_was(ablation_pair):
    pre, ft, measure, _, _ = ablation_pair
    before = {n: t.clone() for n, t in ft.state_dict().items()}
    pairs = studies.matched_groups(ft, pre)
    assert set(pairs) >= {"embeddings/head", "q", "k", "v", "o", "norms", "mlp"}
    tensors = [t for ts, _ in pairs.values() for t in ts]
    values = [v for _, vs in pairs.values() for v in vs]
    assert studies.measured_with(tensors, values, lambda: measure(ft)) == measure(pre)
    result = studies.ablation(ft, pre, measure)
    assert all(torch.equal(t, before[n]) for n, t in ft.state_dict().items())
    assert result["pretrained"] == measure(pre) and result["finetuned"] == measure(ft)
    assert result["finetuned"]["loss"] != result["pretrained"]["loss"]


def with_matrices_interpolated(ft, pre, r):
    """A copy of ft with every k_proj and v_proj weight at pre + r (ft - pre), by name."""
    base = pre.state_dict()
    moved = {n: base[n] + r * (t - base[n]) if n.endswith(("k_proj.weight", "v_proj.weight")) else t
             for n, t in ft.state_dict().items()}
    copied = copy.deepcopy(ft)
    copied.load_state_dict(moved)
    return copied


def test_interpolation_ends_are_the_finetuned_and_the_reverted_model(ablation_pair):
    pre, ft, measure, _, _ = ablation_pair
    result = studies.ablation(ft, pre, measure)
    at = {r: i for i, r in enumerate(result["ratios"])}
    for line, roles in (("K+V", ("k", "v")), ("K", ("k",)), ("V", ("v",))):
        assert result["lines"][line][at[1.0]] == result["finetuned"]  # exact: lerp's weight 1 gives θ
        assert result["lines"][line][at[0.0]] == measure(with_matrices_from(ft, pre, roles))
    for r in (0.5, 1.5):  # lerp rounds otherwise than θ0 + r (θ - θ0)
        expected = measure(with_matrices_interpolated(ft, pre, r))["loss"]
        assert result["lines"]["K+V"][at[r]]["loss"] == pytest.approx(expected, rel=1e-5)
    k_reverted = measure(with_matrices_from(ft, pre, ("k",)))
    assert {key: result["groups"]["k"][key] for key in k_reverted} == k_reverted
    ft_loss, pre_loss = result["finetuned"]["loss"], result["pretrained"]["loss"]
    assert pre_loss > ft_loss
    kv_loss = measure(with_matrices_from(ft, pre, ("k", "v")))["loss"]
    assert result["kv_share_lost"] == pytest.approx((kv_loss - ft_loss) / (pre_loss - ft_loss))
    assert result["groups"]["k"]["share_lost"] == pytest.approx((k_reverted["loss"] - ft_loss) / (pre_loss - ft_loss))


def test_ablate_command_reports_a_saved_run(assets, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert run_train(assets, out, "--method", "zo", "--steps", "4", "--eval_every", "4", "--save") == 0
    report = tmp_path / "ablation.json"
    argv = ["studies.py", "--ablate", str(out / "model"), "--base", assets["causal"], "--task", "sst-2",
            "--data_dir", assets["data"], "--out", str(report)]
    monkeypatch.setattr(sys, "argv", argv)
    studies.main()
    result = json.loads(report.read_text())
    assert report.with_suffix(".png").exists()
    assert set(result["groups"]) == {"embeddings/head", "q", "k", "v", "o", "norms", "attention biases", "mlp",
                                     "other"}
    assert sum(g["params"] for g in result["groups"].values()) == sum(
        p.numel() for p in data.load_model(assets["causal"], "causal", torch.float32, "cpu", False).parameters())
    printed = capsys.readouterr().out
    assert "| k reverted |" in printed and "K and V are reverted" in printed
    monkeypatch.setattr(sys, "argv", argv[:4] + [assets["masked"]] + argv[5:])  # not the model it started from
    with pytest.raises(SystemExit, match="different parameters|tokenizer differs"):
        studies.main()


# studies.py over damaged or misnamed inputs: one line, and a run's files never replaced.

def test_ablate_never_writes_through_a_link_into_a_run(assets, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_train(assets, out, "--method", "zo", "--steps", "2", "--save") == 0
    before = (out / "results.json").read_bytes()
    (tmp_path / "link.json").symlink_to(out / "results.json")
    with pytest.raises(SystemExit) as e:
        studies.main(["--ablate", str(out / "model"), "--base", assets["causal"], "--task", "sst-2",
                      "--data_dir", assets["data"], "--out", str(tmp_path / "link.json")])
    assert "would replace a file of the train.py run" in str(e.value.code)
    assert (out / "results.json").read_bytes() == before


def test_ablate_refuses_a_figure_name_as_its_json_report(assets, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        studies.main(["--ablate", assets["causal"], "--out", str(tmp_path / "abl.png")])
    assert e.value.code == 2 and "ends in .json" in capsys.readouterr().err
    assert not (tmp_path / "abl.png").exists()


def test_ablate_on_a_run_folder_says_to_pass_its_model(assets, tmp_path):
    out = tmp_path / "out"
    assert run_train(assets, out, "--method", "zo", "--steps", "2", "--save") == 0
    with pytest.raises(SystemExit) as e:
        studies.main(["--ablate", str(out), "--base", assets["causal"], "--task", "sst-2", "--data_dir",
                      assets["data"], "--out", str(tmp_path / "abl.json")])
    message = str(e.value.code)
    assert message.startswith("error: --ablate") and str(out / "model") in message and "--model" not in message


@pytest.mark.parametrize("content", ["{}", "[]", '{"methods": {"zo": 1}}', "not json"])
def test_paired_summary_over_a_damaged_run_names_it_in_one_line(tmp_path, content):
    run = tmp_path / "paired" / "full-zo-lr0.00015-s0"
    run.mkdir(parents=True)
    (run / "results.json").write_text(content)
    with pytest.raises(SystemExit) as e:
        studies.main(["--paired", str(tmp_path / "paired"), "--summary-only"])
    message = str(e.value.code)
    assert message.startswith("error: ") and str(run) in message and len(message.splitlines()) == 1
