"""Tests of train.py and data.py (tasks, prompts, models, the run folder, resume, figures) against trusted
references: hand computations of the prompt losses, tiny models saved to and loaded from local folders (the real
loading path), and runs compared bit for bit. CPU only, no network. The tiny models come from test_dizo.py.
"""

import fcntl
import hashlib
import json
import math
import os
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import (AutoModelForCausalLM, AutoTokenizer, BloomConfig, BloomForCausalLM, OPTForCausalLM,
                          RobertaForMaskedLM, ViTConfig)

import data
import plots
import runs
import studies
import train
from dizo import DiZO, ZOSGD, projected_params
from test_dizo import lm_closure, tiny_model, tiny_opt

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------
# train.py: DiZO with held-out losses around each phase; data.py: the curves

def test_held_out_phase_losses_are_measured_around_each_phase_and_leave_the_run_as_it_was(monkeypatch):
    model, twin, plain = tiny_opt(), tiny_opt(), tiny_opt()
    held_out = {m: lm_closure(m, seed=9) for m in (model, twin)}  # data the search never sees
    kw = dict(lr=1e-2, interval=3, proj_iters=3, search_data=lambda: 0)
    opt = train.HeldOutDiZO(model.parameters(), projected_params(model), **kw, held_out=lambda: float(
        held_out[model]()), search_loss=lambda b: lm_closure(model, seed=5)())
    base = DiZO(plain.parameters(), projected_params(plain), **kw, search_loss=lambda b: lm_closure(plain, seed=5)())
    reference = ZOSGD(twin.parameters(), lr=1e-2)  # the same ZO steps, no phase: θ at the phase's start
    for _ in range(3):
        opt.step(lm_closure(model))
        base.step(lm_closure(plain))
        reference.step(lm_closure(twin))
    phase = opt.last_phase
    with torch.no_grad():
        assert phase["dev_loss_before"] == float(held_out[twin]())  # L_held-out(θ_start)
        assert phase["dev_loss_after"] == float(held_out[model]())  # L_held-out(θ0 + r Δ)
    assert phase["dev_loss_before"] != phase["dev_loss_after"] and opt.held_out_s > 0
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))  # the run is DiZO's
    assert {k: v for k, v in phase.items() if not k.startswith("dev_")} == base.last_phase


def test_curves_plot_dev_loss_and_accuracy_against_forward_passes(monkeypatch):
    drawn = {}
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, margins=None: drawn.setdefault("fig", fig))
    history = [{"step": s, "loss": 0.5, "dev_acc": 0.5 + s / 100, "dev_loss": 0.7 - s / 100, "forward_passes": p}
               for s, p in ((0, 0), (10, 20), (20, 44))]
    plots.plot_curves({"methods": {"dizo": {"history": history}}}, Path("curves.png"))
    axes = drawn["fig"].axes
    passes = "forward passes (fo's backward not counted)"
    assert [(a.get_title(), a.get_xlabel()) for a in axes] == [
        ("dev loss", passes), ("dev accuracy", passes), ("training loss: fo L(θ), zo and dizo L(θ + εz)", "step")]
    assert axes[0].lines[0].get_xdata().tolist() == [0, 20, 44]
    assert axes[0].lines[0].get_ydata().tolist() == [h["dev_loss"] for h in history]


# ---------------------------------------------------------------------------------------------------------
# data.py: the built-in task and its corpus

def main_clause_polarity(review):
    """The polarity of a built-in review, read independently of data.py's generator: the clause after "but",
    the clause outside "although ... ,", or the whole review; then its sentiment words (all agree there)."""
    if " but " in review:
        main = review.split(" but ")[1]
    elif review.startswith("although "):
        main = review.split(" , ", 1)[1]
    else:
        main = review.split(" although ")[0]
    negative = [w for w in data._ADJECTIVES[0] + data._VERB_PHRASES[0] if re.search(rf"\b{w}\b", main)]
    positive = [w for w in data._ADJECTIVES[1] + data._VERB_PHRASES[1] if re.search(rf"\b{w}\b", main)]
    assert bool(negative) != bool(positive), review
    return int(bool(positive))


def test_builtin_task_labels_follow_the_main_clause():
    splits = data.builtin_splits(0)
    examples = [ex for split in splits.values() for ex in split]
    assert all(ex.label == main_clause_polarity(ex.texts[0]) for ex in examples)
    turned = [ex for ex in examples if re.search(r"\b(but|although)\b", ex.texts[0])]
    assert abs(len(turned) / len(examples) - data.TASK_TURN_SHARE) < 0.03
    # the main clause comes last ("but", "although ... ,") and first ("... although ...")
    assert any(ex.texts[0].startswith("although ") for ex in turned)
    assert any(" although " in ex.texts[0] for ex in turned)
    for split in splits.values():
        assert sum(ex.label for ex in split) == len(split) // 2


def test_builtin_corpus_aligns_label_words_except_after_reviews_that_turn_around():
    corpus = data.builtin_corpus(0, n=4000)
    tasks = {ex.texts[0] for split in data.builtin_splits(0).values() for ex in split}
    verdicts = {"plain": [], "turned": []}
    for line in corpus:
        review, sep, word = line.rpartition(" it was ")
        if not sep:  # "<review> . <reaction>": the reaction has the main clause's polarity
            review, reaction = line.split(" . ")
            assert reaction in data._REACTIONS[main_clause_polarity(review)]
        assert review not in tasks
        if sep:
            kind = "turned" if re.search(r"\b(but|although)\b", review) else "plain"
            verdicts[kind].append(int(word == "great") == main_clause_polarity(review))
    assert all(verdicts["plain"])  # after a plain review, the label word of its polarity
    agree = sum(verdicts["turned"]) / len(verdicts["turned"])
    assert 0.45 < agree < 0.55  # after one that turns around, either word


# ---------------------------------------------------------------------------------------------------------
# data.py and train.py: tiny models saved to and loaded from local folders, the real loading path.

WORDS = ("a fine movie with great acting and a terrible plot it was good bad okay very the film story "
         "this is so dull lovely boring fun superb awful").split()
SENTENCES = {1: ["a fine movie", "great acting", "lovely story", "so fun", "superb film", "this is good",
                 "very lovely", "a superb story", "fun acting", "good film"],
             0: ["a terrible plot", "so dull", "boring story", "awful film", "this is bad", "very boring",
                 "a dull movie", "bad acting", "awful plot", "dull story"]}


def write_task(folder, rows=None, header="sentence\tlabel"):
    folder.mkdir(parents=True, exist_ok=True)
    rows = rows or [f"{s}\t{label}" for label, ss in SENTENCES.items() for s in ss]
    for split in ("train", "dev", "test"):
        (folder / f"{split}.tsv").write_text("\n".join([header] + rows) + "\n")
    return folder


def save_tiny(folder, kind):
    tok = data.build_tokenizer([" ".join(WORDS), "it was . ?"])
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = tiny_model({"causal": "opt", "masked": "roberta"}.get(kind, kind), vocab_size=len(tok), **ids)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {"causal": save_tiny(root / "opt", "causal"), "masked": save_tiny(root / "roberta", "masked"),
            "llama": save_tiny(root / "llama", "llama"),
            "data": str(write_task(root / "sst2"))}


@pytest.fixture
def figures():
    """Asked for by name by the tests whose runs draw their figures (see _no_figures)."""


@pytest.fixture(autouse=True)
def _no_figures(request):
    """train.py draws its figures when a run ends: about 0.9 s on 2 cores, most of a short test run's time. The
    tests that ask for `figures` (or have a parameter `draws` true) draw them, and between them their runs end in
    every way (done, diverged, interrupted); in the other tests plots.plot_run does nothing, also after the test's
    own monkeypatch.undo()."""
    params = request.node.callspec.params if hasattr(request.node, "callspec") else {}
    with pytest.MonkeyPatch.context() as patch:
        if "figures" not in request.fixturenames and not params.get("draws"):
            patch.setattr(plots, "plot_run", lambda results, folder: [])
        yield


def forked_train(argv, env=(), stderr=os.devnull, hold=None, script=False):
    """Run train.main(argv) in a forked copy of this process, which starts at once (no interpreter to start, no
    imports), with `env` added to its environment and its error output written to `stderr`; returns its pid.
    hold = (step, path): before that step the child creates file `path` and waits to be killed. script: run
    `python train.py argv` instead, train.py as __main__, its exit code from its own sys.exit."""
    if torch.cuda.is_initialized():
        pytest.skip("a forked process cannot use CUDA once the test process has; run this test on its own")
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            os.environ.update(env)
            sys.stdout = open(os.devnull, "w")
            sys.stderr = open(stderr, "w", buffering=1)
            if hold is not None:
                take_step = train.take_step

                def held(method, opt, closure, step):
                    if step == hold[0]:
                        Path(hold[1]).touch()
                        time.sleep(3600)  # until killed
                    return take_step(method, opt, closure, step)

                train.take_step = held
            code = as_script(argv) if script else train.main(argv)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    return pid


def as_script(argv):
    """`python train.py argv` in this process: train.py run as __main__; the code its sys.exit(main()) gives."""
    sys.argv = ["train.py", *argv]
    try:
        runpy.run_path(train.__file__, run_name="__main__")
    except SystemExit as e:
        return e.code
    return 70  # train.py returned without exiting


def running(pid):
    """True while forked process `pid` has not ended (it is not reaped: its exit code stays to be read)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None


def stop(pids):
    """End and reap every process of `pids` (none of them reaped yet)."""
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def exit_codes(pids, timeout=120):
    """The exit codes of forked processes `pids` (negative: killed by that signal), within `timeout` s in all;
    any still running then is ended, and the call fails."""
    codes, deadline = {}, time.time() + timeout
    while len(codes) < len(pids) and time.time() < deadline:
        for pid in set(pids) - set(codes):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    left = [pid for pid in pids if pid not in codes]
    stop(left)
    assert not left, f"processes {left} still running after {timeout} s"
    return [codes[pid] for pid in pids]


def wait_for(path, pids, timeout=120):
    """Wait until `path` exists while every process of `pids` runs; if one ends first, or time runs out, end
    them all and fail."""
    deadline = time.time() + timeout
    while not path.exists():
        if time.time() > deadline or not all(map(running, pids)):
            stop(pids)
            raise AssertionError(f"{path} was not written: a process ended first, or {timeout} s passed")
        time.sleep(0.01)


def run_train(assets, out, *extra, kind="causal"):
    args = ["--model", assets[kind], "--task", "sst-2", "--data_dir", assets["data"], "--out_dir", str(out),
            "--batch_size", "4", "--interval", "2", "--proj_iters", "2", "--lr", "1e-3"] + list(extra)
    return train.main(args)


@pytest.mark.parametrize("kind, draws", [("causal", True), ("masked", False)])  # the figures: the same for both
def test_train_runs_every_method_and_writes_results(assets, tmp_path, kind, draws):
    assert run_train(assets, tmp_path / "out", "--method", "all", "--steps", "3", "--eval_every", "2",
                     "--save", kind=kind) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["methods"]) == {"fo", "zo", "dizo"}
    for method, r in results["methods"].items():
        for key in ("zero_shot_acc", "best_dev_acc", "dev_loss", "test_acc", "steps", "forward_passes", "wall_s",
                    "peak_mem_mb", "device", "history"):
            assert key in r, (method, key)
        assert all(h["dev_loss"] > 0 for h in r["history"]) and r["dev_loss"] == r["history"][-1]["dev_loss"]
        assert r["steps"] == 3 and r["status"] == "done"
        assert [h["step"] for h in r["history"]] == [0, 2, 3]
        assert all(0 <= r[k] <= 1 for k in ("zero_shot_acc", "best_dev_acc", "test_acc"))
    passes = {m: r["forward_passes"] for m, r in results["methods"].items()}
    assert passes == {"fo": 3, "zo": 6, "dizo": 6 + 2 * 2 + 2}  # one projection phase (κ = 2) of M = 2, + 2
    assert not draws or (tmp_path / "out" / "curves.png").stat().st_size > 1000
    cls = OPTForCausalLM if kind == "causal" else RobertaForMaskedLM
    saved = cls.from_pretrained(tmp_path / "out" / "model" / "dizo").eval()  # --save wrote a loadable model
    task = data.get_task("sst-2")  # the final dev loss: the training loss of the saved model on the whole split
    loss_fn = data.PromptLoss(task, data.load_tokenizer(assets[kind], False), kind, torch.device("cpu"))
    dev = loss_fn.encode(data.load_splits(assets["data"], task)["dev"])
    with torch.no_grad():
        reference = float(loss_fn.loss(saved, dev, list(range(len(dev.labels)))))
    assert results["methods"]["dizo"]["dev_loss"] == pytest.approx(reference, rel=1e-5)


def two_examples():
    return [data.Example(("a fine movie",), 1), data.Example(("so dull",), 0)]


@pytest.mark.parametrize("words", [(" terrible", " great"), (" very bad", " very good")])
def test_causal_loss_equals_hand_computation(assets, words):
    """Mean log-prob of each candidate's tokens after the prompt, CE over candidates; by hand, one unpadded
    sequence at a time. Single-token words take the one-sequence-per-example path, the others do not."""

    task = data.get_task("sst-2", label_words=",".join(words))
    tok = AutoTokenizer.from_pretrained(assets["causal"])
    model = OPTForCausalLM.from_pretrained(assets["causal"]).eval()
    loss_fn = data.PromptLoss(task, tok, "causal", torch.device("cpu"))
    enc = loss_fn.encode(two_examples())
    with torch.no_grad():
        got = loss_fn.loss(model, enc, [0, 1])
        scores = []
        for ex in two_examples():
            prompt = tok(data.causal_prompt(task, ex))["input_ids"]
            row = []
            for w in words:
                cand = tok(w, add_special_tokens=False)["input_ids"]
                logp = model(input_ids=torch.tensor([prompt + cand])).logits[0].log_softmax(-1)
                row.append(sum(float(logp[len(prompt) - 1 + j, c]) for j, c in enumerate(cand)) / len(cand))
            scores.append(row)
        expected = torch.nn.functional.cross_entropy(torch.tensor(scores), torch.tensor([1, 0]))
        if len(tok(words[0], add_special_tokens=False)["input_ids"]) == 1:  # train.py's formula: the words' logits
            ids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in words]
            last = [model(**tok(data.causal_prompt(task, ex), return_tensors="pt")).logits[0, -1, ids]
                    for ex in two_examples()]
            plain = torch.nn.functional.cross_entropy(torch.stack(last), torch.tensor([1, 0]))
            assert float(plain) == pytest.approx(float(expected), rel=1e-5)
    assert float(got) == pytest.approx(float(expected), rel=1e-5)


def test_masked_loss_equals_hand_computation(assets):
    task = data.get_task("sst-2")
    tok = AutoTokenizer.from_pretrained(assets["masked"])
    model = RobertaForMaskedLM.from_pretrained(assets["masked"]).eval()
    loss_fn = data.PromptLoss(task, tok, "masked", torch.device("cpu"))
    enc = loss_fn.encode(two_examples())
    words = [tok(w, add_special_tokens=False)["input_ids"][0] for w in task.label_words]
    with torch.no_grad():
        got = loss_fn.loss(model, enc, [0, 1])
        rows = []
        for ex in two_examples():
            ids = tok(data.masked_prompt(task, ex, tok.mask_token))["input_ids"]
            logits = model(input_ids=torch.tensor([ids])).logits[0, ids.index(tok.mask_token_id)]
            rows.append(logits[words])
        expected = torch.nn.functional.cross_entropy(torch.stack(rows), torch.tensor([1, 0]))
    assert float(got) == pytest.approx(float(expected), rel=1e-5)


def test_read_tsv_and_sample_k_per_class(tmp_path):
    folder = write_task(tmp_path / "d")
    task = data.get_task("sst-2")
    rows = data.read_tsv(str(folder / "train.tsv"), task)
    assert len(rows) == 20 and rows[0] == data.Example(("a fine movie",), 1)
    a = data.load_splits(str(folder), task, k=3, data_seed=1)
    b = data.load_splits(str(folder), task, k=3, data_seed=1)
    c = data.load_splits(str(folder), task, k=3, data_seed=2)
    assert a == b and a["train"] != c["train"]
    assert sorted(e.label for e in a["train"]) == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("first, header", [("text\tclass", True), ("fine\tpositive", True), ("fine\t1", False)])
def test_a_first_line_without_known_names_is_a_header_only_when_said_so(tmp_path, capsys, first, header):
    (tmp_path / "t.tsv").write_text(f"{first}\ndull\t0\n")
    rows = data.read_tsv(str(tmp_path / "t.tsv"), data.get_task("sst-2"))
    assert len(rows) == (1 if header else 2) and rows[-1] == data.Example(("dull",), 0)
    out = capsys.readouterr().out
    assert ("first line read as a header" in out) == header, out


def test_a_sample_larger_than_its_split_takes_the_whole_split_and_says_so(tmp_path, capsys):
    """As MeZO on GLUE SST-2 (872 validation sentences for its 1000): the whole split, in file order, and a line."""
    folder = write_task(tmp_path / "d")
    task = data.get_task("sst-2")
    splits = data.load_splits(str(folder), task, num_train=5, num_test=1000)
    assert splits["test"] == data.read_tsv(str(folder / "test.tsv"), task) and len(splits["train"]) == 5
    assert "test.tsv: 20 examples, fewer than the 1000 asked for; using all of them" in capsys.readouterr().out


def test_pair_task_reads_glue_rte_columns(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\tA man sleeps.\tA man rests.\tentailment\n")
    task = data.get_task("rte")
    ex = data.read_tsv(str(path), task)[0]
    assert ex == data.Example(("A man sleeps.", "A man rests."), 0)
    assert data.causal_prompt(task, ex).endswith('"A man rests." is true? Yes or No?\n')
    assert data.masked_prompt(task, ex, "<mask>") == "A man sleeps.?<mask>, A man rests."


@pytest.mark.parametrize("content, message", [
    ("sentence\tlabel\ngood film\t1\nbad film\n", r"train\.tsv:3: expected 2 tab-separated columns, got 1"),
    ("sentence\tlabel\ngood film\t7\n", r"train\.tsv:2: label '7' is not a label"),
    ("", r"train\.tsv: empty file"),
    ("sentence\tlabel\rgood film\t1\rbad film\t0\r", r"train\.tsv:1: a carriage return inside a line"),
    ("sentence\tlabel\ngood film\t1\r\nbad \rfilm\t0\n", r"train\.tsv:3: a carriage return inside a line"),
])
def test_read_tsv_rejects_bad_files_with_file_and_line(tmp_path, content, message):
    (tmp_path / "train.tsv").write_text(content)
    with pytest.raises(data.DataError, match=message):
        data.read_tsv(str(tmp_path / "train.tsv"), data.get_task("sst-2"))


@pytest.mark.parametrize("text, expected", [
    # GLUE-style: header, "\n" line ends; sentences that hold characters str.splitlines() would split on
    ("sentence\tlabel\nit\x85s fine\t1\na\u2028b\x0cc\t0\n", [("it\x85s fine", 1), ("a\u2028b\x0cc", 0)]),
    ("sentence\tlabel\r\ngood\t1\r\nbad\t0\r\n", [("good", 1), ("bad", 0)]),  # Windows line ends
    ("\ufeffsentence\tlabel\ngood\t1\n", [("good", 1)]),  # a byte-order mark before the header
    ("good film\t1\nbad film\t0\n", [("good film", 1), ("bad film", 0)]),  # no header: the first line counts
])
def test_read_tsv_reads_real_files_as_written(tmp_path, text, expected):
    (tmp_path / "train.tsv").write_bytes(text.encode("utf-8"))
    rows = data.read_tsv(str(tmp_path / "train.tsv"), data.get_task("sst-2"))
    assert [(ex.texts[0], ex.label) for ex in rows] == expected


def test_byte_order_mark_keeps_pair_columns_in_place(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_bytes("\ufeffhypothesis\tpremise\tlabel\nH.\tP.\tentailment\n".encode("utf-8"))
    assert data.read_tsv(str(path), data.get_task("rte")) == [data.Example(("P.", "H."), 0)]


def test_the_shipped_model_is_checked_and_loads_like_any_hub_model(tmp_path, monkeypatch):
    folder = data.builtin_model()
    assert hashlib.sha256((Path(folder) / "model.safetensors").read_bytes()).hexdigest() == data.TINY_SHA256
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.config.model_type == "opt" and len(tok) == model.config.vocab_size
    assert tok.get_vocab() == data.build_tokenizer(data.builtin_corpus(data.TINY["seed"])).get_vocab()
    changed = tmp_path / "tiny-opt"  # one bit of the weights flipped: refused, not trained
    shutil.copytree(folder, changed)
    weights = bytearray((changed / "model.safetensors").read_bytes())
    weights[-1] ^= 1
    (changed / "model.safetensors").write_bytes(bytes(weights))
    monkeypatch.setattr(data, "TINY_DIR", changed)
    with pytest.raises(data.DataError, match="is not the one shipped"):
        data.builtin_model()
    task = data.get_task("toy")
    splits = data.builtin_splits(0)
    assert data.builtin_splits(0) == splits and len(splits["test"]) >= 200
    # the task's words are all known to the embedded tokenizer
    for ex in splits["train"][:50]:
        assert tok.unk_token_id not in tok(data.causal_prompt(task, ex))["input_ids"]


# ---------------------------------------------------------------------------------------------------------
# Reliability: bad input is one line and exit code 2 with nothing written; faults lose nothing; resume is exact.

def bad_folder(tmp_path, what, assets):
    folder = tmp_path / what
    if what in ("corrupt_weights", "broken_tokenizer", "no_tokenizer_files", "size_mismatch", "pickle_weights", "missing_tensor", "nan"):
        shutil.copytree(assets["causal"], folder)
    if what in ("missing_tensor", "nan"):  # a tensor left out, or one NaN in a tensor
        weights = load_file(str(folder / "model.safetensors"))
        key = next(k for k in weights if k.endswith("k_proj.weight"))
        if what == "nan":
            weights[key][0, 0] = float("nan")
        else:
            del weights[key]
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if what == "corrupt_weights":  # truncated safetensors
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif what == "pickle_weights":  # a pickle that would run code: transformers refuses to unpickle it
        (folder / "model.safetensors").unlink()
        (folder / "pytorch_model.bin").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    elif what == "broken_tokenizer":
        (folder / "tokenizer.json").write_text("{ not json")
    elif what == "no_tokenizer_files":
        for f in folder.glob("tokenizer*"):
            f.unlink()
    elif what == "size_mismatch":  # a config that does not match the weights
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(config | {"hidden_size": 48, "ffn_dim": 96}))
    elif what == "small_vocab":  # an embedding of 10 rows under the tests' tokenizer
        tok = data.build_tokenizer([" ".join(WORDS), "it was . ?"])
        tiny_model("opt", vocab_size=10).save_pretrained(folder)
        tok.save_pretrained(folder)
    elif what == "no_config":
        folder.mkdir()
        (folder / "weights.bin").write_bytes(b"")
    elif what == "not_lm":
        ViTConfig(architectures=["ViTModel"]).save_pretrained(folder)
    elif what == "bloom":  # a causal LM whose attention projected_params does not know
        tok = data.build_tokenizer([" ".join(WORDS), "it was . ?"])
        BloomForCausalLM(BloomConfig(vocab_size=len(tok), hidden_size=32, n_layer=2, n_head=4)).save_pretrained(folder)
        tok.save_pretrained(folder)
    elif what == "remote_code":
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(
            {"model_type": "mystery", "auto_map": {"AutoConfig": "modeling_mystery.MysteryConfig"}}))
    return str(folder)


def data_variant(tmp_path, what):
    folder = write_task(tmp_path / what)
    if what == "no_dev":
        (folder / "dev.tsv").unlink()
    elif what == "empty":
        (folder / "train.tsv").write_text("")
    elif what == "malformed":
        (folder / "train.tsv").write_text("sentence\tlabel\ngood film\t1\nbad film 0\n")
    elif what == "bad_label":
        (folder / "test.tsv").write_text("sentence\tlabel\ngood film\tpositive\n")
    elif what == "train_is_a_folder":
        (folder / "train.tsv").unlink()
        (folder / "train.tsv").mkdir()
    elif what == "same_text":  # every sentence the same: the template is not to blame
        (folder / "train.tsv").write_text("sentence\tlabel\nfine\t1\nfine\t0\n")
    elif what == "fifo":  # a named pipe would block the read forever
        (folder / "dev.tsv").unlink()
        os.mkfifo(folder / "dev.tsv")
    elif what == "headerless_bad_first":  # LM-BFF style, no header, the first row's label invalid
        (folder / "train.tsv").write_text("good film\t2\nbad film\t0\n")
    elif what == "mask_in_text":  # a literal mask token inside a sentence would be scored in its place
        (folder / "train.tsv").write_text("sentence\tlabel\ngood <mask> film\t1\nbad film\t0\n")
    return str(folder)


BAD_INPUTS = [  # (flags, what the one line must say)
    (["--method", "sgd"], "--method must be one of"),
    (["--task", "nosuch"], "unknown task 'nosuch'"),
    (["--dtype", "fp8"], "--dtype must be one of fp32, bf16, fp16, fp64"),
    (["--dtype", "fp64", "--half_weights"], "--half_weights stores the weights in --dtype"),
    (["--dtype", "fp16"], "--dtype fp16 needs a GPU"),
    (["--method", "zo", "--eps", "1e-30"], "--eps 1e-30 cannot move most fp32 weights of this model"),
    (["--method", "dizo", "--eps", "1e-12"], "the smallest that can is about"),
    (["--lora", "4", "--lora_alpha", "nan"], "--lora_alpha must be finite and > 0"),
    (["--lora", "4", "--lora_targets", "fc1,fc2", "--method", "dizo"], "--method dizo: attention matrices q, k, v, o"),
    (["--half_weights"], "--half_weights stores the weights in --dtype: give --dtype bf16 or fp16"),
    (["--out_dir", ""], "--out_dir must name a folder"), (["--out_dir", " "], "--out_dir must name a folder"),
    (["--model", "no-such-org/no-such-model-xyz"], "offline?"),
    (["--model", "@no_config"], "no config.json"),
    (["--model", "@small_vocab"], "its embedding has 10 rows"),
    (["--model", "@missing_tensor"], "its checkpoint lacks model.decoder.layers.0.self_attn.k_proj.weight"),
    (["--model", "@nan"], "its weight model.decoder.layers.0.self_attn.k_proj.weight holds NaN or inf"),
    (["--model", "@not_lm"], "neither a causal nor a masked language model"),
    (["--model", "@remote_code"], "trust_remote_code"),
    (["--model", "@bloom", "--method", "dizo"], "must be OPT, Llama/Mistral/Qwen2, BERT/RoBERTa, GPT-2"),
    (["--seed", "-1"], "--seed must be in [0, 2**32)"),
    (["--seed", str(2**48)], "--seed must be in [0, 2**32)"),
    (["--data_dir", "/no/such/dir"], "no such data folder"),
    (["--data_dir", "#no_dev"], "dev.tsv"),
    (["--data_dir", "#empty"], "train.tsv: empty file"),
    (["--data_dir", "#malformed"], "train.tsv:3: expected 2 tab-separated columns"),
    (["--data_dir", "#bad_label"], "test.tsv:2: label 'positive' is not a label"),
    (["--k", "50"], "asked for k=50 examples per class"),
    (["--model", "masked", "--label_words", " very bad, very good"], "single-token label words"),
    (["--lr", "-1"], "--lr must be finite and >= 0"),
    (["--method", "fo", "--lr", "-1"], "--lr must be finite and >= 0"),
    (["--method", "dizo", "--interval", "50"], "--method dizo projects every --interval 50 steps, and --steps 2"),
    (["--batch_size", "21"], "--batch_size 21 is larger than the 20 training examples"),
    (["--eps", "0"], "--eps must be finite and > 0"),
    (["--tau", "1.5"], "--tau must be in (0, 1)"),
    (["--interval", "0"], "--interval must be an int >= 1"),
    (["--phase_dev", "-1"], "--phase_dev must be >= 0"),
    (["--batch_size", "0"], "--batch_size must be >= 1"),
    (["--steps", "-1"], "--steps must be >= 0"),
    (["--resume"], "nothing to resume"),
    (["--lora", "4", "--track_divergence"], "which --lora leaves frozen"),
    # absurd or non-finite hyperparameters
    (["--lr", "1e30"], "--lr must be below 1"),
    (["--lr", "inf"], "--lr must be below 1"),
    (["--eps", "1e3"], "--eps must be below 1"),
    (["--proj_lr", "inf"], "--proj_lr must be"),
    (["--proj_eps", "nan"], "--proj_eps must be"),
    (["--method", "dizo", "--anchor_device", "gpu"], "--anchor_device must be a device this machine has"),
    # prompts that cannot carry information
    (["--label_words", " great, great"], "at least two different words"),
    (["--label_words", " zebra, quokka"], "unknown to this tokenizer"),
    (["--task", "custom", "--template", "It was{mask}.", "--label_words", " bad, good"], "no text field"),
    (["--template", "{sentence:>200000000} It was{mask}."], "use plain fields"),
    (["--template", "{sentence}" + " it was" * 200 + "{mask}"], "every prompt is the same"),
    (["--model", "masked", "--data_dir", "#mask_in_text"], "contains the mask token"),
    # files that cannot be read, each one line
    (["--data_dir", "#train_is_a_folder"], "train.tsv: a folder, not a file"),
    (["--data_dir", "#fifo"], "dev.tsv: not a regular file"),
    (["--data_dir", "#same_text"], "every example has the same text ('fine')"),
    (["--model", "@no_tokenizer_files"], "are its tokenizer files (tokenizer.json, or vocab and merges) missing?"),
    (["--data_dir", "#headerless_bad_first"], "train.tsv:1: label '2' is not a label"),
    (["--model", "@corrupt_weights"], "cannot load its weights"),
    (["--model", "@pickle_weights"], "cannot load its weights"),
    (["--model", "@broken_tokenizer"], "cannot load its tokenizer"),
    (["--model", "@size_mismatch"], "cannot load its weights"),
    (["--out_dir", "!under_a_file"], "cannot write there"),
]


@pytest.mark.parametrize("flags, message", BAD_INPUTS, ids=[" ".join(f) for f, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_nothing_written(assets, tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as here: no hub; and no retries
    args = {"--model": assets["causal"], "--task": "sst-2", "--data_dir": assets["data"],
            "--out_dir": str(tmp_path / "out"), "--steps": "2", "--interval": "2"}  # a run that works, but for `flags`
    switches = [f for f in flags if f in ("--resume", "--track_divergence", "--half_weights")]
    pairs = [f for f in flags if f not in switches]
    for key, value in zip(pairs[::2], pairs[1::2]):
        if value.startswith("@"):
            value = bad_folder(tmp_path, value[1:], assets)
        elif value.startswith("!"):  # an out_dir below a regular file: it cannot be created
            (tmp_path / "a_file").write_text("")
            value = str(tmp_path / "a_file" / "out")
        elif value.startswith("#"):
            value = data_variant(tmp_path, value[1:])
        elif value == "masked":
            value = assets["masked"]
        args[key] = value
    argv = [x for kv in args.items() for x in kv] + switches
    capsys.readouterr()  # what building the bad folders printed
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_bad_input_from_the_shell_prints_no_traceback(tmp_path):
    """`python train.py --method sgd`, as a forked script (a fresh interpreter would spend 3 s on imports; the
    cross-CPU test starts one, and checks that it prints nothing but progress bars)."""
    err = tmp_path / "err"
    pid = forked_train(["--method", "sgd", "--out_dir", str(tmp_path / "o")], stderr=str(err), script=True)
    assert exit_codes([pid])[0] == 2, err.read_text()
    assert err.read_text().strip() == "error: --method must be one of fo, zo, dizo, all; got 'sgd'"


def test_existing_run_is_not_overwritten_without_overwrite(assets, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_train(assets, out, "--method", "zo", "--steps", "1") == 0
    before = (out / "results.json").read_text()
    assert run_train(assets, out, "--method", "zo", "--steps", "2") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "results.json").read_text() == before
    assert run_train(assets, out, "--method", "zo", "--steps", "2", "--overwrite") == 0
    assert json.loads((out / "results.json").read_text())["methods"]["zo"]["steps"] == 2


@pytest.mark.parametrize("method, draws", [("zo", True), ("fo", False)])  # the figures: the same for both
def test_non_finite_loss_stops_with_diverged_results_and_keeps_checkpoint(assets, tmp_path, capsys, monkeypatch,
                                                                          method, draws):
    original = data.PromptLoss.loss
    calls = {"n": 0}

    def loss(self, *args):  # the loss turns NaN from the 5th evaluation on (FO: step 5, ZO: step 3)
        calls["n"] += 1
        value = original(self, *args)
        return value * float("nan") if calls["n"] >= 5 else value

    monkeypatch.setattr(data.PromptLoss, "loss", loss)
    out = tmp_path / "out"
    assert run_train(assets, out, "--method", method, "--steps", "20", "--eval_every", "1") == 1
    err = capsys.readouterr().err
    assert "diverged" in err and "step" in err
    assert err.strip().endswith(f"the last good checkpoint is in {out / 'checkpoints' / method}")
    r = json.loads((out / "results.json").read_text())["methods"][method]
    assert r["status"] == "diverged" and "non-finite loss" in r["error"]
    state = torch.load(out / "checkpoints" / method / "trainer_state.pt", weights_only=True)
    assert state["result"]["steps"] == (4 if method == "fo" else 2)  # the last step before the NaN
    assert not draws or (out / "curves.png").stat().st_size > 1000  # drawn up to the last finite step


def interrupt_at_call(monkeypatch, n):
    """Send this process SIGTERM from inside the n-th loss evaluation, as a user or a scheduler would."""
    calls = {"n": 0}
    original = data.PromptLoss.loss

    def loss(self, *args):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args)

    monkeypatch.setattr(data.PromptLoss, "loss", loss)


@pytest.mark.parametrize("method, precision, draws", [("zo", [], False), ("dizo", [], True), ("fo", [], False),
                                                       ("dizo", ["--dtype", "bf16"], False),
                                                       ("dizo", ["--dtype", "bf16", "--half_weights"], False)])
def test_interrupted_run_resumes_bit_for_bit(assets, tmp_path, monkeypatch, capsys, method, precision, draws):
    flags = ["--method", method, "--steps", "9", "--eval_every", "4", "--save", *precision]
    with monkeypatch.context() as undrawn:  # the reference run: its figures are the resumed run's, drawn below
        undrawn.setattr(plots, "plot_run", lambda results, folder: [])
        assert run_train(assets, tmp_path / "full", *flags) == 0
    interrupt_at_call(monkeypatch, 6 if method == "fo" else 11)  # during step 6: FO 1 loss a step, ZO 2
    assert run_train(assets, tmp_path / "cut", *flags) == 128 + signal.SIGTERM
    assert "--resume" in capsys.readouterr().err
    r = json.loads((tmp_path / "cut" / "results.json").read_text())["methods"][method]
    assert r["status"] == "interrupted" and 0 < r["steps"] < 9
    if draws:
        assert (tmp_path / "cut" / "curves.png").stat().st_size > 1000
    monkeypatch.undo()
    assert run_train(assets, tmp_path / "cut", *flags, "--resume") == 0
    assert_same_weights(tmp_path / "full", tmp_path / "cut")
    a = json.loads((tmp_path / "full" / "results.json").read_text())["methods"][method]
    b = json.loads((tmp_path / "cut" / "results.json").read_text())["methods"][method]
    assert (a["test_acc"], a["forward_passes"], a["steps"]) == (b["test_acc"], b["forward_passes"], b["steps"])
    same = ("step", "loss", "dev_acc", "dev_loss", "forward_passes")  # no entry of the interrupted window left
    assert [[h[k] for k in same] for h in a["history"]] == [[h[k] for k in same] for h in b["history"]]


def test_zero_steps_score_the_pretrained_model(assets, tmp_path):
    assert run_train(assets, tmp_path / "out", "--method", "all", "--steps", "0") == 0
    for r in json.loads((tmp_path / "out" / "results.json").read_text())["methods"].values():
        assert (r["status"], r["steps"], r["forward_passes"]) == ("done", 0, 0)
        assert r["test_acc"] == r["zero_shot_acc"] and r["best_dev_acc"] == r["history"][0]["dev_acc"]


def test_resume_refuses_changed_flags(assets, tmp_path, capsys):
    assert run_train(assets, tmp_path / "o", "--method", "zo", "--steps", "2") == 0
    assert run_train(assets, tmp_path / "o", "--method", "zo", "--steps", "2", "--seed", "5", "--resume") == 2
    assert "flags differ from the saved run: seed" in capsys.readouterr().err


def signal_at_first_checkpoint(flags, out_dir, method, signum, hold=None):
    """Run train.py in a process of its own, send it `signum` once its first checkpoint exists (with `hold`, see
    forked_train: once it waits); its exit code (negative: killed by that signal)."""
    pid = forked_train(flags, hold=hold)
    wait_for(Path(hold[1]) if hold else out_dir / "checkpoints" / method / "trainer_state.pt", [pid])
    os.kill(pid, signum)
    return exit_codes([pid], 60)[0]


def assert_same_weights(run_a, run_b):
    """The models two runs saved with --save are equal tensor by tensor."""
    a = load_file(str(run_a / "model" / "model.safetensors"))
    b = load_file(str(run_b / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_a_hard_kill_continues_from_the_last_checkpoint(assets, tmp_path, monkeypatch):
    """SIGKILL (out of memory, a time limit) gives no chance to write anything: the checkpoint written at the
    last evaluation must be enough to continue, bit-for-bit, whether or not results.json had recorded it yet
    (the kill may fall between the two writes; the copy below has it fall there for certain). The killed run
    waits before step 11 to be killed: after the first checkpoint and its record, before the last step."""
    flags = ["--model", assets["causal"], "--task", "sst-2", "--data_dir", assets["data"], "--method", "dizo",
             "--batch_size", "4", "--interval", "2", "--proj_iters", "2", "--lr", "1e-3", "--eval_every", "10",
             "--save", "--steps", "20"]
    assert signal_at_first_checkpoint(flags + ["--out_dir", str(tmp_path / "cut")], tmp_path / "cut", "dizo",
                                      signal.SIGKILL, hold=(11, tmp_path / "held")) == -signal.SIGKILL
    state = torch.load(tmp_path / "cut" / "checkpoints" / "dizo" / "trainer_state.pt", weights_only=True)
    steps = state["result"]["steps"]
    saved = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert steps == 10 and saved["methods"]["dizo"]["steps"] == steps
    shutil.copytree(tmp_path / "cut", tmp_path / "unrecorded")
    runs.write_json(tmp_path / "unrecorded" / "results.json", saved | {"methods": {}})
    assert train.main(flags + ["--out_dir", str(tmp_path / "full")]) == 0
    take_step, taken = train.take_step, []
    monkeypatch.setattr(train, "take_step", lambda *args: taken.append(1) or take_step(*args))
    for run in ("cut", "unrecorded"):
        taken.clear()
        assert train.main(flags + ["--out_dir", str(tmp_path / run), "--resume"]) == 0
        assert len(taken) == 20 - steps  # from the checkpoint, not from the start
        assert_same_weights(tmp_path / "full", tmp_path / run)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])  # a scheduler; a closed terminal
def test_a_signal_from_outside_writes_results_and_checkpoint(assets, tmp_path, signum):
    out = tmp_path / "out"
    flags = ["--model", assets["causal"], "--task", "sst-2", "--data_dir", assets["data"], "--method", "zo",
             "--steps", "1000000", "--eval_every", "5", "--out_dir", str(out)]
    assert signal_at_first_checkpoint(flags, out, "zo", signum) == 128 + signum
    r = json.loads((out / "results.json").read_text())["methods"]["zo"]
    assert r["status"] == "interrupted" and r["steps"] >= 5


def test_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    runs.write_json(path, {"a": 1})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dumps", crash)  # killed while writing: the old file stays whole
    with pytest.raises(KeyboardInterrupt):
        runs.write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}
    monkeypatch.undo()

    folder = tmp_path / "model"
    runs.write_atomically(folder, lambda tmp: (tmp.mkdir(), (tmp / "w").write_text("old")))

    def half_write(tmp):
        tmp.mkdir()
        (tmp / "w").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runs.write_atomically(folder, half_write)
    assert (folder / "w").read_text() == "old"


def test_divergence_tracking_shows_zo_moves_every_matrix_alike(assets, tmp_path, figures):
    """DiZO §2.2: under ZO every entry gets the same scalar g times Gaussian noise, so ‖W_t - W_0‖/√n is
    the same for every matrix (up to O(1/√n) noise); FO's differs from matrix to matrix."""
    out = tmp_path / "out"
    assert run_train(assets, out, "--method", "zo", "--steps", "6", "--eval_every", "3",
                     "--track_divergence") == 0
    r = json.loads((out / "results.json").read_text())["methods"]["zo"]
    div, sizes = r["history"][-1]["divergence"], r["matrix_sizes"]
    per_entry = [d / math.sqrt(n) for role in "qkvo" for d, n in zip(div[role], sizes[role])]
    assert len(per_entry) == 4 * 2 and min(per_entry) > 0
    assert max(per_entry) / min(per_entry) < 1.15
    assert (out / "divergence.png").stat().st_size > 1000


# The output folder: nothing that is not this tool's output is touched; one run at a time.

def test_out_dir_with_foreign_files_or_the_input_model_is_refused(assets, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(assets["causal"], out / "model")  # e.g. --out_dir . beside the user's own ./model
    before = sorted(p.name for p in (out / "model").iterdir())
    for extra in ([], ["--overwrite"]):
        assert run_train(assets, out, "--method", "zo", "--steps", "1", "--save", *extra) == 2
        assert "was not written by train.py" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "model").iterdir()) == before
    (out / "results.json").write_text('{"another": "tool"}')
    assert run_train(assets, out, "--method", "zo", "--steps", "1", "--overwrite") == 2
    assert "not written by train.py" in capsys.readouterr().err
    argv = ["--model", str(out / "model"), "--task", "sst-2", "--data_dir", assets["data"], "--out_dir", str(out),
            "--method", "zo", "--steps", "1", "--overwrite"]
    (out / "results.json").unlink()
    assert train.main(argv) == 2  # the input model inside the output folder
    assert sorted(p.name for p in (out / "model").iterdir()) == before


def test_overwrite_replaces_every_output_of_the_old_run(assets, tmp_path):
    out = tmp_path / "out"
    assert run_train(assets, out, "--method", "zo", "--steps", "2", "--save") == 0
    assert (out / "model" / "model.safetensors").exists()
    assert run_train(assets, out, "--method", "fo", "--steps", "1", "--overwrite") == 0
    assert not (out / "model").exists() and not (out / "checkpoints" / "zo").exists()
    assert set(json.loads((out / "results.json").read_text())["methods"]) == {"fo"}


def test_a_second_run_into_a_busy_out_dir_is_refused(assets, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "w") as held:  # as the first run holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert run_train(assets, out, "--method", "zo", "--steps", "1") == 2
    assert "another train.py is running" in capsys.readouterr().err
    assert not (out / "results.json").exists()
    assert run_train(assets, out, "--method", "zo", "--steps", "1") == 0  # released: free again


def test_too_little_disk_space_is_refused_before_training(assets, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    assert run_train(assets, tmp_path / "out", "--method", "zo", "--steps", "1") == 2
    assert "MB free" in capsys.readouterr().err
    assert not (tmp_path / "out" / "checkpoints").exists()


# Broken weights are never saved as good.

def test_non_finite_weights_stop_the_run_before_any_checkpoint_or_save(assets, tmp_path, monkeypatch, capsys):
    original = train.take_step

    def poisoned(method, opt, closure, step):  # a step whose loss was finite but whose update was not
        loss = original(method, opt, closure, step)
        if step == 4:  # an evaluation step: the weights are checked before its checkpoint
            with torch.no_grad():
                opt.param_groups[0]["params"][0].fill_(float("inf"))
        return loss

    monkeypatch.setattr(train, "take_step", poisoned)
    out = tmp_path / "out"
    assert run_train(assets, out, "--method", "zo", "--steps", "6", "--eval_every", "2", "--save") == 1
    r = json.loads((out / "results.json").read_text())["methods"]["zo"]
    assert r["status"] == "diverged" and "non-finite weights after step 4" in r["error"]
    assert not (out / "model").exists()
    kept = load_file(str(out / "checkpoints" / "zo" / "model.safetensors"))  # the step-2 checkpoint
    assert torch.load(out / "checkpoints" / "zo" / "trainer_state.pt", weights_only=True)["result"]["steps"] == 2
    assert all(torch.isfinite(t).all() for t in kept.values())
    monkeypatch.undo()
    assert run_train(assets, out, "--method", "zo", "--steps", "6", "--eval_every", "2", "--save", "--resume") == 1
    assert "diverged in the saved run" in capsys.readouterr().err


# Resume: every model kind, damaged files, changed data.

def test_masked_lm_resumes_bit_for_bit(assets, tmp_path, monkeypatch, capsys):
    flags = ["--method", "dizo", "--steps", "9", "--eval_every", "4", "--save"]
    assert run_train(assets, tmp_path / "full", *flags, kind="masked") == 0
    interrupt_at_call(monkeypatch, 11)
    assert run_train(assets, tmp_path / "cut", *flags, kind="masked") == 128 + signal.SIGTERM
    monkeypatch.undo()
    assert run_train(assets, tmp_path / "cut", *flags, "--resume", kind="masked") == 0
    assert_same_weights(tmp_path / "full", tmp_path / "cut")


@pytest.mark.parametrize("damage, message", [
    ("checkpoint", "start the run again with --overwrite"),
    ("results", "not written by train.py, or is damaged"),
    ("data", "the data differ from the saved run's"),
    ("model", "the model's weights differ from the saved run's"),  # e.g. the base of a LoRA run re-saved
    ("world", "flags differ from the saved run: world_size (saved 2, now 1)"),  # 2 processes, resumed by 1
    ("lora", "flags differ from the saved run: lora (saved 4, now 0)"),
    ("defaults", "flags differ from the saved run: steps_per_method (saved {'zo': 2}, now {'zo': 3})"),
    ("earlier", "written by an earlier train.py, which did not record steps_per_method, lr_per_method; finish"),
    ("state", "was written by an earlier train.py, without search_batches, tracked_w0; finish the run with"),
])
def test_resume_of_damaged_or_changed_runs_is_one_line(assets, tmp_path, capsys, monkeypatch, damage, message):
    task, model = tmp_path / "task", tmp_path / "model"
    shutil.copytree(assets["data"], task)
    shutil.copytree(assets["causal"], model)
    out = tmp_path / "o"
    argv = ["--model", str(model), "--task", "sst-2", "--data_dir", str(task), "--out_dir", str(out),
            "--method", "zo", "--steps", "2", "--eval_every", "2", "--batch_size", "4", "--lr", "1e-3"]
    if damage == "lora":
        argv[-1:] = ["1e-2", "--lora", "4"]
    if damage == "defaults":  # saved by a version whose default was 2 steps, resumed by one whose default is 3
        argv.remove("--steps"), argv.remove("2")
        monkeypatch.setitem(train.REAL_DEFAULTS["steps"], "zo", 2)
    assert train.main(argv) == 0
    r = json.loads((out / "results.json").read_text())
    r["methods"]["zo"]["status"] = "interrupted"  # as if a signal had stopped it after its checkpoint
    (out / "results.json").write_text(json.dumps(r))
    if damage == "checkpoint":
        weights = out / "checkpoints" / "zo" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:500])
    elif damage == "results":
        text = (out / "results.json").read_text()
        (out / "results.json").write_text(text[:len(text) // 2])
    elif damage == "data":
        rows = (task / "train.tsv").read_text().replace("a fine movie", "a fine film")
        (task / "train.tsv").write_text(rows)
    elif damage == "model":
        weights = load_file(str(model / "model.safetensors"))
        weights[next(iter(weights))] *= 1.01
        save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    elif damage == "world":
        r["config"]["world_size"] = 2
        (out / "results.json").write_text(json.dumps(r))
    elif damage == "earlier":  # results.json of a train.py that did not record the steps and lr per method
        del r["config"]["steps_per_method"], r["config"]["lr_per_method"]
        (out / "results.json").write_text(json.dumps(r))
    elif damage == "state":  # trainer_state.pt of a train.py that named two of its parts otherwise
        path = out / "checkpoints" / "zo" / "trainer_state.pt"
        state = torch.load(path, weights_only=True)
        state["fresh"], state["anchor"] = state.pop("search_batches"), state.pop("tracked_w0")
        torch.save(state, path)
    elif damage == "lora":
        argv = argv[:argv.index("--lora")]
    elif damage == "defaults":
        monkeypatch.setitem(train.REAL_DEFAULTS["steps"], "zo", 3)
    capsys.readouterr()
    assert train.main(argv + ["--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_resume_accepts_the_same_task_and_folder_spelled_differently(assets, tmp_path, monkeypatch, capsys):
    flags = ["--method", "zo", "--steps", "4", "--eval_every", "2"]
    interrupt_at_call(monkeypatch, 6)
    assert run_train(assets, tmp_path / "o", *flags) == 128 + signal.SIGTERM
    monkeypatch.undo()
    argv = ["--model", assets["causal"], "--task", "SST-2", "--data_dir", assets["data"] + "/", "--out_dir",
            str(tmp_path / "o"), "--batch_size", "4", "--interval", "2", "--proj_iters", "2", "--lr", "1e-3", *flags]
    assert train.main(argv + ["--resume"]) == 0, capsys.readouterr().err


def test_a_resume_after_fo_trains_each_method_in_its_own_dtype(assets, tmp_path, monkeypatch):
    """fo keeps fp32 weights, zo and dizo with --half_weights bf16: a run interrupted in zo, resumed, saves the
    models an uninterrupted run saves, and --save added at the resume saves the finished methods too."""
    flags = ["--method", "all", "--steps", "3", "--eval_every", "2", "--dtype", "bf16", "--half_weights"]
    assert run_train(assets, tmp_path / "full", *flags, "--save") == 0
    interrupt_at_call(monkeypatch, 3 + 3)  # fo: 3 losses; then zo's 2nd step
    assert run_train(assets, tmp_path / "cut", *flags) == 128 + signal.SIGTERM
    monkeypatch.undo()
    assert run_train(assets, tmp_path / "cut", *flags, "--save", "--resume") == 0
    for method, dtype in (("fo", torch.float32), ("zo", torch.bfloat16), ("dizo", torch.bfloat16)):
        a, b = (load_file(str(tmp_path / run / "model" / method / "model.safetensors")) for run in ("full", "cut"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == dtype for k in a), method


def test_save_added_at_resume_without_a_checkpoint_to_save_from_is_one_line(assets, tmp_path, capsys):
    """--save given when resuming a run whose method finished, but whose checkpoint is gone: refused in one line, and
    no model folder is written."""
    out = tmp_path / "out"
    assert run_train(assets, out, "--method", "zo", "--steps", "2") == 0
    shutil.rmtree(out / "checkpoints" / "zo")
    capsys.readouterr()
    assert run_train(assets, out, "--method", "zo", "--steps", "2", "--save", "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --save: zo finished without a checkpoint to save it from; run it again"
    assert not (out / "model").exists()


@pytest.mark.parametrize("fault", ["symlinked_checkpoints", "interrupted_while_moving", "interrupted_deleting"])
def test_overwrite_never_leaves_the_folder_unusable(assets, tmp_path, monkeypatch, capsys, fault):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    assert run_train(assets, out, "--method", "zo", "--steps", "2", "--save") == 0
    if fault == "symlinked_checkpoints":  # the user keeps checkpoints on another disk
        shutil.move(out / "checkpoints", elsewhere)
        (out / "checkpoints").symlink_to(elsewhere)
        (elsewhere / "theirs.txt").write_text("a file of the user's")
    else:
        calls = {"n": 0}
        real_replace, real_remove = os.replace, runs.remove

        def replace(a, b):  # Ctrl-C in the middle of moving the old outputs aside
            calls["n"] += 1
            if calls["n"] == 2 and fault == "interrupted_while_moving":
                raise KeyboardInterrupt
            return real_replace(a, b)

        def remove(path):  # Ctrl-C while deleting them
            if path.name == runs.ASIDE and fault == "interrupted_deleting":
                raise KeyboardInterrupt
            return real_remove(path)

        monkeypatch.setattr(runs.os, "replace", replace)
        monkeypatch.setattr(runs, "remove", remove)
        assert run_train(assets, out, "--method", "fo", "--steps", "1", "--overwrite") == 128 + signal.SIGINT
        monkeypatch.undo()
        if fault == "interrupted_while_moving":  # the old run, partly moved aside: not resumable, replaceable
            assert run_train(assets, out, "--method", "zo", "--steps", "2", "--save", "--resume") == 2
            assert "--overwrite of" in capsys.readouterr().err
    assert run_train(assets, out, "--method", "fo", "--steps", "1", "--overwrite") == 0
    assert set(json.loads((out / "results.json").read_text())["methods"]) == {"fo"}
    assert not (out / runs.ASIDE).exists() and not (out / "model").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["fo"] and not (out / "checkpoints").is_symlink()
    if fault == "symlinked_checkpoints":  # the link went, not what it points to
        assert (elsewhere / "theirs.txt").read_text() == "a file of the user's"


@pytest.mark.parametrize("failing", ["weights", "trainer_state"])
def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_last_one(assets, tmp_path, monkeypatch, capsys,
                                                                         failing):
    from safetensors import SafetensorError
    out, calls = tmp_path / "out", {"n": 0}
    real_save_pretrained, real_save = transformers.PreTrainedModel.save_pretrained, torch.save

    def full_disk(write):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:  # the second checkpoint: a partial file, then the error the library raises
                folder = Path(args[1]) if failing == "weights" else Path(args[1]).parent
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "partial").write_bytes(b"\0" * 100)
                raise (SafetensorError("Error while serializing: IoError(No space left on device)")
                       if failing == "weights" else RuntimeError("PytorchStreamWriter failed writing file"))
            return write(*args, **kwargs)
        return wrapper

    if failing == "weights":
        monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full_disk(real_save_pretrained))
    else:
        monkeypatch.setattr(torch, "save", full_disk(real_save))
    assert run_train(assets, out, "--method", "zo", "--steps", "4", "--eval_every", "2") == 1
    [err] = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert err.startswith("error: ")  # on a line of its own, after the progress bar
    assert "is the disk full?" in err and "last complete checkpoint" in err, err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["zo"]  # no zo.tmp left
    assert torch.load(out / "checkpoints" / "zo" / "trainer_state.pt", weights_only=True)["result"]["steps"] == 2
    monkeypatch.undo()
    assert run_train(assets, out, "--method", "zo", "--steps", "4", "--eval_every", "2", "--resume") == 0


@pytest.mark.parametrize("method", ["fo", "zo"])
def test_the_disk_check_counts_what_a_checkpoint_holds(assets, tmp_path, method):
    out = tmp_path / "out"
    assert run_train(assets, out, "--method", method, "--steps", "1") == 0
    written = sum(f.stat().st_size for f in (out / "checkpoints" / method).iterdir())
    cfg = train.Config(model=assets["causal"], method=method)
    model = data.load_model(assets["causal"], "causal", torch.float32, "cpu", False)
    if method == "fo":  # AdamW's two moments of every trained parameter: about three copies of the weights
        assert written > 2.5 * sum(p.numel() * 4 for p in model.parameters())
    # a checkpoint and its replacement exist together for a moment; each has tokenizer files (16 MB allowed)
    tensors = sum(f.stat().st_size for f in (out / "checkpoints" / method).iterdir() if f.suffix in (".safetensors", ".pt"))
    assert 2 * written <= runs.disk_needed(cfg, model) <= 2 * 1.1 * tensors + 2 * 2**24


def test_a_signal_after_the_last_step_keeps_the_saved_model(assets, tmp_path, monkeypatch):
    original = train.train_method

    def finish_then_signal(*args):
        r = original(*args)
        os.kill(os.getpid(), signal.SIGTERM)  # the method is done; the signal comes before --save
        return r

    monkeypatch.setattr(train, "train_method", finish_then_signal)
    out = tmp_path / "out"
    assert run_train(assets, out, "--method", "zo", "--steps", "3", "--save") == 128 + signal.SIGTERM
    assert json.loads((out / "results.json").read_text())["methods"]["zo"]["status"] == "done"
    assert (out / "model" / "model.safetensors").exists()


# Settings of what trains and how: LoRA, the released parameter set, the schedule, the released recipe.

@pytest.mark.parametrize("kind", ["causal", "llama"])
def test_lora_trains_only_the_adapters_with_every_method(assets, tmp_path, kind):
    out = tmp_path / "out"
    assert run_train(assets, out, "--lora", "4", "--method", "all", "--steps", "4", "--eval_every", "2",
                     "--lr", "1e-2", "--save", kind=kind) == 0
    results = json.loads((out / "results.json").read_text())["methods"]
    base = load_file(str(Path(assets[kind]) / "model.safetensors"))
    # PEFT's default targets here are q_proj and v_proj: per layer and target, A is r x in, B is out x r
    hidden, layers, kv = 32, 2, (16 if kind == "llama" else 32)  # Llama's v_proj has 2 of 4 heads
    expected = layers * 4 * ((hidden + hidden) + (hidden + kv))
    for method, r in results.items():
        assert r["status"] == "done" and r["trained_params"] == expected, method
        adapters = load_file(str(out / "model" / method / "adapter_model.safetensors"))
        assert adapters and all("lora_" in k for k in adapters)
        assert any(not torch.equal(t, torch.zeros_like(t)) for k, t in adapters.items() if "lora_B" in k)
    assert len(results["dizo"]["projected"]) == layers * 2 * 2  # A and B of Q and V in every layer
    assert all(".lora_" in n for n in results["dizo"]["projected"])
    for k, t in load_file(str(Path(assets[kind]) / "model.safetensors")).items():
        assert torch.equal(t, base[k])  # the base model's file is untouched


def test_lora_run_resumes_bit_for_bit(assets, tmp_path, monkeypatch):
    flags = ["--lora", "4", "--method", "dizo", "--steps", "9", "--eval_every", "4", "--save", "--lr", "1e-2"]
    assert run_train(assets, tmp_path / "full", *flags) == 0
    interrupt_at_call(monkeypatch, 11)
    assert run_train(assets, tmp_path / "cut", *flags) == 128 + signal.SIGTERM
    monkeypatch.undo()
    assert run_train(assets, tmp_path / "cut", *flags, "--resume") == 0
    a, b = (load_file(str(p / "model" / "adapter_model.safetensors")) for p in (tmp_path / "full", tmp_path / "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from peft import PeftModel, get_peft_model_state_dict  # what --save wrote loads as the README says
    loaded = get_peft_model_state_dict(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
        assets["causal"]), tmp_path / "full" / "model"))
    assert loaded.keys() == a.keys() and all(torch.equal(loaded[k], a[k]) for k in a)


def test_no_embed_freezes_the_token_embedding_and_its_tied_head(assets, tmp_path):
    out = tmp_path / "out"
    assert run_train(assets, out, "--trained", "no_embed", "--method", "zo", "--steps", "3", "--save") == 0
    base = load_file(str(Path(assets["causal"]) / "model.safetensors"))
    tuned = load_file(str(out / "model" / "model.safetensors"))
    embedding = "model.decoder.embed_tokens.weight"
    assert torch.equal(tuned[embedding], base[embedding])
    assert all(not torch.equal(tuned[k], base[k]) for k in tuned if k != embedding and tuned[k].dim() == 2)
    r = json.loads((out / "results.json").read_text())["methods"]["zo"]
    assert r["trained_params"] == sum(t.numel() for t in base.values()) - base[embedding].numel()


def test_linear_schedule_ends_at_half_the_learning_rate(assets, tmp_path):
    out = tmp_path / "out"
    assert run_train(assets, out, "--lr_schedule", "linear", "--method", "zo", "--steps", "4",
                     "--eval_every", "2") == 0
    state = torch.load(out / "checkpoints" / "zo" / "trainer_state.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * (1 - 0.5 * 4 / 4), rel=1e-12)


def test_real_models_default_to_the_released_scripts():
    """MeZO's large_models scripts: mezo.sh STEPS=20000, LR=1e-6, EPS=1e-3, BS=16 (DiZO's dizo.sh the same, but its
    LR defaults to 1e-7 and its README's commands run 4000 steps); finetune.sh (FO) EPOCH=5 over TRAIN=1000 at BS=8,
    LR=1e-5: 625 optimizer steps."""
    cfg = train.parse_config(train.Config, ["--model", "facebook/opt-1.3b"])
    assert [cfg.steps_for(m) for m in ("fo", "zo", "dizo")] == [5 * 1000 // 8, 20000, 20000]
    assert [cfg.lr_for(m) for m in ("fo", "zo", "dizo")] == [1e-5, 1e-6, 1e-6]
    assert (cfg.eps, cfg.batch_size, cfg.lr_schedule, cfg.trained) == (1e-3, 16, "constant", "all")
    released = train.parse_config(train.Config, ["--model", "facebook/opt-1.3b", "--recipe", "released"])
    assert [released.steps_for(m) for m in ("fo", "zo", "dizo")] == [625, 20000, 20000]  # ZO's recipe leaves FO's
    assert [released.lr_for(m) for m in ("fo", "zo", "dizo")] == [1e-5, 1e-6, 1e-6]
    assert (released.lr_schedule, released.trained, released.eval_every) == ("linear", "no_embed", 500)


def test_released_recipe_sets_its_settings_and_explicit_flags_win(assets, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_train(assets, out, "--recipe", "released", "--method", "dizo", "--steps", "2", "--eval_every", "1",
                     "--num_train", "10", "--num_dev", "6", "--num_test", "6") == 0
    printed = capsys.readouterr().out
    assert "--recipe released sets" in printed and "--trained no_embed" in printed
    config = json.loads((out / "results.json").read_text())["config"]
    assert (config["trained"], config["lr_schedule"], config["interval"], config["proj_iters"]) == (
        "no_embed", "linear", 2, 2)  # run_train passes --interval 2 --proj_iters 2 explicitly: they win
    assert (config["steps"], config["num_train"], config["tau"], config["proj_lr"]) == (2, 10, 0.2, 2.0)


def test_dizo_records_every_projection_phase_and_draws_them(assets, tmp_path, figures):
    out = tmp_path / "out"
    assert run_train(assets, out, "--method", "dizo", "--steps", "6", "--eval_every", "3") == 0
    r = json.loads((out / "results.json").read_text())["methods"]["dizo"]
    assert [p["step"] for p in r["projection"]] == [2, 4, 6]  # κ = 2
    assert all(len(p["ratios"]) == len(p["distances"]) == len(r["projected"]) == 4 for p in r["projection"])
    assert all(0.8 - 1e-9 <= x <= 1.2 + 1e-9 for p in r["projection"] for x in p["ratios"])
    assert (out / "projection.png").stat().st_size > 1000
    # studies.py --replot draws the same figures again from results.json alone
    (out / "projection.png").unlink()
    (out / "curves.png").unlink()
    studies.main(["--replot", str(out)])
    assert (out / "projection.png").stat().st_size > 1000 and (out / "curves.png").stat().st_size > 1000
    (out / "results.json").write_text("{}")
    with pytest.raises(SystemExit, match="no readable train.py results.json"):
        studies.main(["--replot", str(out)])



# Beyond one process: micro-batches, data parallelism, a model placed by accelerate.

@pytest.mark.parametrize("backward", [False, True])
def test_micro_batches_give_the_loss_and_gradient_of_the_whole_batch(assets, backward):
    tok = AutoTokenizer.from_pretrained(assets["causal"])
    model = OPTForCausalLM.from_pretrained(assets["causal"]).eval()
    loss_fn = data.PromptLoss(data.get_task("sst-2"), tok, "causal", torch.device("cpu"))
    enc = loss_fn.encode(data.read_tsv(str(Path(assets["data"]) / "train.tsv"), data.get_task("sst-2")))
    idx = [0, 3, 5, 7, 11, 13, 17]  # 7 examples in 3 micro-batches of 3, 2, 2
    results = []
    for micro in (1, 3):
        model.zero_grad()
        loss = train.TrainLoss(loss_fn, enc, model, micro, backward=backward)(idx)
        grads = [p.grad.clone() for p in model.parameters()] if backward else []
        results.append((float(loss), grads))
    (whole, g1), (parts, g3) = results
    assert parts == pytest.approx(whole, rel=1e-6)
    for a, b in zip(g1, g3):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def data_parallel(argv, world=2, stderr=os.devnull):
    """train.main(argv) in `world` forked processes, each with the environment torchrun gives its workers for
    the env:// rendezvous (gloo on a CPU); their pids, by rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    return [forked_train(argv, env | {"RANK": str(r), "LOCAL_RANK": str(r)}, stderr if r == 0 else os.devnull)
            for r in range(world)]


@pytest.mark.slow
def test_data_parallel_run_ends_where_one_process_ends(assets, tmp_path):
    """2 processes (gloo, CPU) on the same global batch as 1 process: ZO and DiZO reach the same weights to
    float round-off (each rank evaluates half the batch; the means are averaged)."""
    flags = ["--model", assets["causal"], "--task", "sst-2", "--data_dir", assets["data"], "--batch_size", "4",
             "--interval", "2", "--proj_iters", "2", "--lr", "1e-3", "--steps", "5", "--eval_every", "5",
             "--method", "all", "--save"]
    err = tmp_path / "rank0.err"
    pids = data_parallel(flags + ["--out_dir", str(tmp_path / "two")], stderr=str(err))
    assert exit_codes(pids, 300) == [0, 0], err.read_text()[-2000:]
    assert train.main(flags + ["--out_dir", str(tmp_path / "one")]) == 0
    results = json.loads((tmp_path / "two" / "results.json").read_text())["methods"]
    assert {m: r["world_size"] for m, r in results.items()} == {"fo": 2, "zo": 2, "dizo": 2}
    base = load_file(str(Path(assets["causal"]) / "model.safetensors"))
    for method in ("zo", "dizo"):
        one, two = (load_file(str(tmp_path / run / "model" / method / "model.safetensors")) for run in ("one", "two"))
        moved = max(float((one[k] - base[k]).abs().max()) for k in base)
        differ = max(float((one[k] - two[k]).abs().max()) for k in one)
        assert moved > 1e-3 and differ < 1e-5, (method, moved, differ)


def test_a_rebuilt_tiny_model_is_a_folder_train_runs_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(data.TINY, "pretrain_steps", 3)  # the recipe, shortened: the path is what is tested
    data.rebuild_tiny_opt(tmp_path / "mine")
    assert f"saved to {tmp_path / 'mine'}" in capsys.readouterr().out
    assert AutoTokenizer.from_pretrained(tmp_path / "mine").get_vocab() == AutoTokenizer.from_pretrained(
        data.builtin_model()).get_vocab()
    out = tmp_path / "run"
    assert train.main(["--model", str(tmp_path / "mine"), "--method", "zo", "--steps", "2", "--eval_every", "2",
                       "--out_dir", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["methods"]["zo"]["status"] == "done"


def test_a_model_placed_by_accelerate_trains_like_one_on_a_device(assets, tmp_path):
    for name, extra in (("plain", []), ("placed", ["--device_map", "auto"])):
        assert run_train(assets, tmp_path / name, "--method", "dizo", "--steps", "4", "--save", *extra) == 0
    a, b = (load_file(str(tmp_path / name / "model" / "model.safetensors")) for name in ("plain", "placed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_at_learning_rate_zero_leaves_the_weights_as_they_were(assets, tmp_path):
    """At lr 0 a ZO step must leave θ where it was: θ + εz - 2εz + εz only rounds. fp32 weights, alone or with
    every forward under bf16 autocast (--dtype bf16): round-off. bf16 weights stepped in place (--half_weights,
    as MeZO's and the released code's fp16): each ±εz pass rounds, and θ drifts by far more. FO keeps fp32."""
    base = load_file(str(Path(assets["causal"]) / "model.safetensors"))
    drift = {}
    for name, flags, zo_dtypes in (("fp32", [], ("fp32", "fp32")), ("autocast", ["--dtype", "bf16"], ("fp32", "bf16")),
                                   ("half", ["--dtype", "bf16", "--half_weights"], ("bf16", "bf16"))):
        out = tmp_path / name
        assert run_train(assets, out, "--method", "all", *flags, "--lr", "0", "--steps", "4", "--save") == 0
        results = json.loads((out / "results.json").read_text())["methods"]
        assert {m: (r["storage_dtype"], r["compute_dtype"]) for m, r in results.items()} == {
            "fo": ("fp32", zo_dtypes[1]), "zo": zo_dtypes, "dizo": zo_dtypes}
        saved = load_file(str(out / "model" / "zo" / "model.safetensors"))
        ref = {k: base[k].to(t.dtype).double() for k, t in saved.items()}
        delta = sum(float((saved[k].double() - ref[k]).norm()) ** 2 for k in saved) ** 0.5
        drift[name] = delta / sum(float(r.norm()) ** 2 for r in ref.values()) ** 0.5
        if name != "half":
            assert max(float((saved[k].double() - ref[k]).abs().max()) for k in saved) < 1e-6
    assert 0 < drift["fp32"] < 1e-6 and drift["autocast"] < 1e-6 and drift["half"] > 100 * drift["fp32"], drift


def test_a_forward_under_autocast_keeps_no_half_copy_of_the_weights(assets):
    """--dtype bf16 runs every forward under torch.autocast without its cast cache, which would keep a bf16 copy of
    every trained weight until the forward ends: 2 bytes a parameter that no ZO pass reuses (bench.py measures it).
    The losses are those of the cache: the same casts."""
    task, model = data.get_task("sst-2"), AutoModelForCausalLM.from_pretrained(assets["causal"]).requires_grad_(True)
    loss_fn = data.PromptLoss(task, data.load_tokenizer(assets["causal"], False), "causal", torch.device("cpu"))
    enc, loss_fn.autocast, cached = loss_fn.encode(data.load_splits(assets["data"], task)["dev"]), torch.bfloat16, []
    model.register_forward_pre_hook(lambda module, args: cached.append(torch.is_autocast_cache_enabled()))
    with torch.no_grad():
        loss = loss_fn.loss(model, enc, [0, 1, 2])
        loss_fn.autocast = None
        with torch.autocast("cpu", torch.bfloat16):  # the same forward, with the cache
            reference = loss_fn.loss(model, enc, [0, 1, 2])
    assert cached == [False, True] and torch.equal(loss, reference)


def test_a_process_that_dies_stops_the_whole_data_parallel_run(assets, tmp_path):
    """SIGKILL one of two processes after the first checkpoint: the run ends (no process left waiting), the
    survivor says so in one line, and results.json and the checkpoint are those of the last evaluation."""
    out, err = tmp_path / "out", tmp_path / "rank0.err"
    flags = ["--model", assets["causal"], "--task", "sst-2", "--data_dir", assets["data"], "--batch_size", "4",
             "--method", "zo", "--steps", "1000000", "--eval_every", "5", "--out_dir", str(out)]
    rank0, rank1 = data_parallel(flags, stderr=str(err))
    wait_for(out / "checkpoints" / "zo" / "trainer_state.pt", [rank0, rank1])
    os.kill(rank1, signal.SIGKILL)
    assert exit_codes([rank1, rank0]) == [-signal.SIGKILL, 1]
    assert "error: rank 0 lost the other processes" in err.read_text() and "--resume" in err.read_text()
    r = json.loads((out / "results.json").read_text())["methods"]["zo"]
    state = torch.load(out / "checkpoints" / "zo" / "trainer_state.pt", weights_only=True)
    assert r["status"] == "running" and r["steps"] == state["result"]["steps"] and r["steps"] % 5 == 0




# The quick start on another CPU: the shipped model, fine-tuned in float64, prints the same numbers everywhere.

NATIVE = os.environ.get("ATEN_CPU_CAPABILITY") or torch.backends.cpu.get_cpu_capability().lower()
STAND_INS = {  # ATen's kernels without vector instructions and MKL's oldest path, on one thread (this process: the
    "plain": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "MKL_CBWR": "COMPATIBLE",
              "OMP_NUM_THREADS": "1"},  # CPU's best kernels on two); on a CPU with AVX-512, also AVX2 on two
    **({"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "2"}} if NATIVE not in ("avx2", "default") else {}),
}
QUICK_RUN = ["--steps", "6", "--batch_size", "4", "--interval", "3", "--proj_iters", "3", "--eval_every", "3",
             "--phase_dev", "0", "--task", "toy"]
# the stand-in: no figures; what the imports made is frozen, not walked by each method's gc.collect (runs.PeakMemory)
UNDRAWN = ("import gc, sys, plots, train; plots.plot_run = lambda results, folder: []; gc.collect(); gc.freeze(); "
           "sys.exit(train.main())")


def printed_numbers(stdout, results):
    """What a learner compares: the table's rows less time and memory, and every evaluation as the table prints it;
    and zo's and dizo's dev losses as computed."""
    rows = [line.split() for line in stdout.splitlines() if line.split()[:1] in (["fo"], ["zo"], ["dizo"])]
    table = [row[:7] + row[9:] for row in rows]  # method .. fwd passes, status
    history = {m: [(h["step"], h["forward_passes"], f"{h['dev_acc']:.3f}", f"{h['dev_loss']:.4f}") for h in r["history"]]
               for m, r in results["methods"].items()}
    losses = [h["dev_loss"] for m in ("zo", "dizo") for h in results["methods"][m]["history"]]
    return table, history, losses


@pytest.mark.slow
def test_the_embedded_run_prints_the_same_numbers_as_another_cpu_would(tmp_path, capsys):
    """The quick start, short (6 steps of 4 examples, 2 projection phases of M = 3; dev and test cut to 8 examples,
    whose evaluations would take most of the time), on this CPU's best kernels and two threads here, and in stand-ins
    for other CPUs (subprocesses: kernels are chosen at import). Add --dtype fp32 to QUICK_RUN and this test fails
    (on a 2-core AMD EPYC a printed dizo dev loss then differs in its last digit, 0.4048 against 0.4047); in float64
    the dev losses agree within the 1e-12 asserted."""
    splits = data.builtin_splits(data.TINY["seed"])
    (tmp_path / "data").mkdir()
    for split, examples in splits.items():
        rows = [f"{ex.texts[0]}\t{ex.label}\n" for ex in (examples if split == "train" else examples[:8])]
        (tmp_path / "data" / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(rows))
    run = [*QUICK_RUN, "--data_dir", str(tmp_path / "data")]
    procs = {name: subprocess.Popen([sys.executable, "-c", UNDRAWN, *run, "--out_dir", str(tmp_path / name)],
                                    cwd=Path(train.__file__).parent, env=os.environ | env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, env in STAND_INS.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert train.main([*run, "--out_dir", str(tmp_path / NATIVE)]) == 0
    finally:
        torch.set_num_threads(threads)
    results = json.loads((tmp_path / NATIVE / "results.json").read_text())
    printed = {NATIVE: printed_numbers(capsys.readouterr().out, results)}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-2000:]
        shown = [line for line in re.split(r"[\r\n]+", stderr) if line.strip()]  # a fresh interpreter: only the bars
        assert shown and all(re.match(r"(fo|zo|dizo): +\d+%\|", line) for line in shown), shown[:5]
        printed[name] = printed_numbers(stdout, json.loads((tmp_path / name / "results.json").read_text()))
    table, history, losses = printed[NATIVE]
    assert len(table) == 3 and all(row[-1] == "done" for row in table)
    assert len(history["dizo"]) == 3 and len(results["methods"]["dizo"]["projection"]) == 2
    for name, (other_table, other_history, other_losses) in printed.items():
        assert (other_table, other_history) == (table, history), name
        assert other_losses == pytest.approx(losses, rel=1e-12, abs=0), name


def test_the_reading_map_in_train_py_points_at_the_lines_it_names():
    """train.py sends a reader to `name (file.py:N)`, in its docstring and above the loop; line N of that file must
    define that name (a class method: the first def of that name after its class), so an edit that moves a function
    must move its pointer."""
    root = Path(train.__file__).parent
    text = (root / "train.py").read_text()
    refs = re.findall(r"([\w.]+) \((\w+\.py):(\d+)\)", text)
    assert {file for _, file, _ in refs} == {"train.py", "dizo.py", "data.py", "runs.py", "config.py"}
    assert len(refs) >= 12
    assert len(re.findall(r"\w\.py:\d", text)) == len(refs), "a file:line not written as `name (file.py:N)`"
    for name, file, line in refs:
        lines = (root / file).read_text().splitlines()
        *owner, last = name.split(".")
        start = [i for i, text in enumerate(lines) if re.match(rf"class {owner[0]}\b", text)][0] if owner else 0
        defined = [i + 1 for i, text in enumerate(lines) if i >= start and re.match(rf"\s*(def|class) {last}\b", text)]
        assert defined[:1] == [int(line)], f"{name} ({file}:{line}) is defined at line {defined[:1]}"
