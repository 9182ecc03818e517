"""Inputs train.py must refuse in one line before it writes anything: a model folder whose config.json builds fewer
layers than its weights hold, weights that are a pickle, a header-less TSV whose first column holds ids, a split
with one class. And the ordinary inputs next to them that must still be read."""
import json
import logging
import os
import pickle
import re
import shutil

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForMaskedLM, BertForPreTraining, OPTModel

import data
import train
from test_dizo import tiny_model
from test_train import SENTENCES, WORDS, save_tiny, write_task

FAMILIES = {"opt": "causal", "llama": "causal", "gpt2": "causal", "gpt_neox": "causal", "roberta": "masked"}
LAYERS = {"gpt2": "n_layer"}  # the config field of the number of layers, where not num_hidden_layers


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny model of each family saved by save_pretrained (with its tokenizer), and a task folder of both classes."""
    root = tmp_path_factory.mktemp("inputs")
    return {family: save_tiny(root / family, family) for family in FAMILIES} | {"data": str(write_task(root / "d"))}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # local folders only; no retries


def copy_of(folders, family, tmp_path, name=None):
    folder = tmp_path / (name or family)
    shutil.copytree(folders[family], folder)
    return folder


def edit_config(folder, **fields):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | fields))


def add_tensors(folder, **tensors):
    weights = load_file(str(folder / "model.safetensors")) | tensors
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


def load(folder, kind="causal"):
    return data.load_model(str(folder), kind, torch.float32, torch.device("cpu"), False)


def refused(capsys, tmp_path, model, data_dir, *flags):
    """train.main on these inputs: exit 2, one line `error: ...` on stderr, no out_dir; returns that line."""
    out = tmp_path / "out"
    argv = ["--model", str(model), "--data_dir", str(data_dir), "--task", "sst-2", "--out_dir", str(out),
            "--steps", "1", "--method", "zo", *flags]
    capsys.readouterr()
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert not out.exists()
    return err


# ------------------------------------------------------------------------- weights the model does not have
# Buffers that older versions saved with the weights, and heads or poolers a masked LM does not have: real
# checkpoints (gpt2, EleutherAI's Pythia, Llama 2, roberta-large) hold them, and they are no reason to refuse.
LEGACY = {
    "opt": {},
    "gpt2": {"transformer.h.0.attn.bias": torch.tril(torch.ones(1, 1, 64, 64)),
             "transformer.h.1.attn.masked_bias": torch.tensor(-1e4)},
    "llama": {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4),
              "model.layers.1.self_attn.rotary_emb.inv_freq": torch.ones(4)},
    "gpt_neox": {"gpt_neox.layers.0.attention.rotary_emb.inv_freq": torch.ones(2),
                 "gpt_neox.layers.0.attention.bias": torch.tril(torch.ones(1, 1, 64, 64)),
                 "gpt_neox.layers.1.attention.masked_bias": torch.tensor(-1e9)},
    "roberta": {"roberta.embeddings.position_ids": torch.arange(66)[None],
                "roberta.pooler.dense.weight": torch.zeros(32, 32), "roberta.pooler.dense.bias": torch.zeros(32)},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_an_ordinary_folder_of_each_family_loads_with_and_without_old_buffers(folders, tmp_path, family):
    model = load(folders[family], FAMILIES[family])
    assert not model.training
    folder = copy_of(folders, family, tmp_path)
    add_tensors(folder, **LEGACY[family])
    again = load(folder, FAMILIES[family])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_a_masked_lm_from_a_pretraining_checkpoint_loads_without_its_other_head(tmp_path):
    """As bert-base-uncased: its weights hold the pooler and next-sentence head of BertForPreTraining."""
    tok = data.build_tokenizer([" ".join(WORDS), "it was . ?"])
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    BertForPreTraining(config).save_pretrained(tmp_path / "bert")
    edit_config(tmp_path / "bert", architectures=["BertForMaskedLM"])
    assert any(k.startswith("cls.seq_relationship") for k in load_file(str(tmp_path / "bert" / "model.safetensors")))
    assert isinstance(load(tmp_path / "bert", "masked"), BertForMaskedLM)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_config_with_fewer_layers_than_its_weights_is_refused(folders, tmp_path, family):
    folder = copy_of(folders, family, tmp_path)
    edit_config(folder, **{LAYERS.get(family, "num_hidden_layers"): 1})
    with pytest.raises(data.DataError) as err:
        load(folder, FAMILIES[family])
    # GPT-2's pattern of buffers to ignore, "attn.bias", also matches c_attn.bias: transformers drops it from the keys
    extra = [k for k in load_file(str(folder / "model.safetensors")) if ".1." in k
             and not (family == "gpt2" and k.endswith("c_attn.bias"))]
    message = str(err.value)
    assert message.startswith(f"--model {folder}: its checkpoint holds {len(extra)} weight(s) the model does not "
                              "have (") and message.endswith("does config.json match the weights (e.g. its number "
                                                             "of layers)?"), message
    assert ".1." in message.split("have (")[1] and "..." in message


def test_the_layers_past_the_config_are_named_in_layer_order(tmp_path):
    """Twelve layers in the weights, two in the config: the first named are those of layer 2, not 10."""
    tok = data.build_tokenizer([" ".join(WORDS), "it was . ?"])
    tiny_model("opt", vocab_size=len(tok), num_hidden_layers=12).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    edit_config(tmp_path / "m", num_hidden_layers=2)
    with pytest.raises(data.DataError, match=r"holds 160 weight\(s\) the model does not have "
                                             r"\(model\.decoder\.layers\.2\.fc1\.bias, "):
        load(tmp_path / "m")


def test_weights_of_a_base_model_checkpoint_are_matched_without_its_prefix(folders, tmp_path):
    """A checkpoint of OPTModel names its keys decoder.layers... (no "model."): a layer too many is still refused."""
    model = load(folders["opt"])
    folder = tmp_path / "base"
    OPTModel(model.config).save_pretrained(folder)
    shutil.copy(os.path.join(folders["opt"], "tokenizer.json"), folder)
    assert load(folder).config.num_hidden_layers == 2  # the head is tied to the embedding: nothing missing
    edit_config(folder, num_hidden_layers=1)
    with pytest.raises(data.DataError, match=r"holds 16 weight\(s\) the model does not have \(decoder\.layers\.1\."):
        load(folder)


def test_biases_the_config_leaves_out_are_refused(folders, tmp_path):
    folder = copy_of(folders, "opt", tmp_path)
    edit_config(folder, enable_bias=False)
    with pytest.raises(data.DataError, match=r"holds \d+ weight\(s\) the model does not have \(model\.decoder\."
                                             r"layers\.0\.fc1\.bias"):
        load(folder)


@pytest.fixture
def load_reports():
    """The load reports (tables of missing and unexpected keys) that transformers logs while this test runs."""
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record) if "LOAD REPORT" in str(record.msg) else None
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_transformers_table_is_held_back_when_refused_and_shown_when_the_model_loads(folders, tmp_path, load_reports):
    cut = copy_of(folders, "opt", tmp_path)
    edit_config(cut, num_hidden_layers=1)
    with pytest.raises(data.DataError, match="the model does not have"):
        load(cut)
    assert load_reports == []  # the refusal is the one line
    pooler = copy_of(folders, "roberta", tmp_path)
    add_tensors(pooler, **LEGACY["roberta"])
    load(pooler, "masked")
    assert len(load_reports) == 1 and "roberta.pooler.dense.weight" in load_reports[0].getMessage()
    assert not logging.getLogger("transformers.modeling_utils").filters


def test_train_refuses_a_truncated_model_in_one_line(folders, tmp_path, capsys):
    folder = copy_of(folders, "opt", tmp_path)
    edit_config(folder, num_hidden_layers=1)
    err = refused(capsys, tmp_path, folder, folders["data"])
    assert "its checkpoint holds 16 weight(s) the model does not have (model.decoder.layers.1." in err


# ------------------------------------------------------------------------------------------- pickles
class RunsCode:
    """Unpickled, it runs a shell command: what a malicious pytorch_model.bin does under torch.load."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def pickle_folder(folders, tmp_path, marker, file="pytorch_model.bin", keep_safetensors=False):
    folder = copy_of(folders, "opt", tmp_path, "pickled")
    if not keep_safetensors:
        (folder / "model.safetensors").unlink()
    (folder / file).write_bytes(pickle.dumps({"model.decoder.embed_tokens.weight": RunsCode(f"touch {marker}")}))
    return folder


def test_the_pickle_of_the_test_really_runs_its_code(tmp_path):
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(RunsCode(f"touch {marker}")))
    assert marker.exists()


def test_a_pickle_that_would_run_code_is_never_unpickled_and_the_run_is_refused(folders, tmp_path, capsys):
    marker = tmp_path / "pwned"
    folder = pickle_folder(folders, tmp_path, marker)
    err = refused(capsys, tmp_path, folder, folders["data"])
    assert not marker.exists()
    assert err.startswith(f"error: --model {folder}: cannot load its weights: the folder has no model.safetensors "
                          "(its weight files: pytorch_model.bin); only safetensors files are loaded, never a pickle")
    assert f".from_pretrained('{folder}', use_safetensors=False).save_pretrained('{folder}')" in err


def test_a_config_that_names_a_pickle_as_its_weights_is_refused(folders, tmp_path, capsys):
    """config.json's transformers_weights would make transformers torch.load that file, safetensors or not."""
    marker = tmp_path / "pwned"
    folder = pickle_folder(folders, tmp_path, marker, file="adapter_model.bin", keep_safetensors=True)
    edit_config(folder, transformers_weights="adapter_model.bin")
    err = refused(capsys, tmp_path, folder, folders["data"])
    assert not marker.exists()
    assert "its config.json names weights file adapter_model.bin, not a .safetensors file" in err


def test_a_folder_of_pytorch_weights_is_refused_and_the_command_it_gives_converts_it(folders, tmp_path):
    folder = copy_of(folders, "opt", tmp_path)
    original = load(folder)
    (folder / "model.safetensors").unlink()
    torch.save(original.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(data.DataError) as err:
        load(folder)
    command = re.search(r'python -c "(.*)"$', str(err.value)).group(1)
    exec(command, {})  # what the user is told to run
    assert (folder / "model.safetensors").exists()
    converted = load(folder)
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), converted.state_dict().values()))


def test_a_folder_without_any_weights_says_so(folders, tmp_path):
    folder = copy_of(folders, "opt", tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(data.DataError, match=r"the folder has no model\.safetensors \(its weight files: none\)"):
        load(folder)


# --------------------------------------------------------------------------------------- TSV columns
def tsv(tmp_path, text, name="train.tsv"):
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


ID_ROWS = "0\tgood film\t1\n1\tbad film\t0\n2\tfine acting\t1\n"


def test_a_headerless_file_whose_first_column_holds_ids_is_refused(tmp_path):
    path = tsv(tmp_path, ID_ROWS)
    with pytest.raises(data.DataError) as err:
        data.read_tsv(path, data.get_task("sst-2"))
    assert str(err.value) == (f"{path}: 3 columns and no header, the first looks like ids (0, 1, 2...): add a header "
                              "line naming the columns (e.g. idx, sentence, label)")


def test_a_header_of_other_names_over_an_id_column_is_refused(tmp_path, capsys):
    path = tsv(tmp_path, "id\ttext\tlabel\n" + ID_ROWS)
    with pytest.raises(data.DataError, match=r"train\.tsv:1: the header \['id', 'text', 'label'\] names no column "
                                             r"sentence and label, so columns go by position, and the first holds "
                                             r"only numbers \(0, 1, 2\.\.\.\), ids rather than text"):
        data.read_tsv(path, data.get_task("sst-2"))
    assert capsys.readouterr().out == ""  # no "read as a header" line before the error


def test_a_pair_task_with_ids_first_is_refused_too(tmp_path):
    with pytest.raises(data.DataError, match=r"4 columns and no header, .*\(e\.g\. idx, premise, hypothesis, label\)"):
        data.read_tsv(tsv(tmp_path, "0\tA man sleeps.\tA man rests.\tentailment\n"), data.get_task("rte"))


@pytest.mark.parametrize("text, expected", [
    ("idx\tsentence\tlabel\n" + ID_ROWS, [("good film", 1), ("bad film", 0), ("fine acting", 1)]),  # named: ids unread
    ("good film\tweb\t1\nbad film\tweb\t0\n", [("good film", 1), ("bad film", 0)]),  # text first, by position
    ("1984\t1\n2001\t0\n", [("1984", 1), ("2001", 0)]),  # numbers as the only text column are the text
    ("0\tgood film\t1\nfilm\tbad film\t0\n", [("0", 1), ("film", 0)]),  # not all numbers: not an id column
])
def test_files_without_an_id_column_read_as_before(tmp_path, text, expected):
    rows = data.read_tsv(tsv(tmp_path, text), data.get_task("sst-2"))
    assert [(ex.texts[0], ex.label) for ex in rows] == expected


def test_train_refuses_an_id_column_in_one_line(folders, tmp_path, capsys):
    folder = write_task(tmp_path / "d")
    (folder / "train.tsv").write_text(ID_ROWS)
    err = refused(capsys, tmp_path, folders["opt"], folder)
    assert err == (f"error: {folder}/train.tsv: 3 columns and no header, the first looks like ids (0, 1, 2...): add "
                   "a header line naming the columns (e.g. idx, sentence, label)")


# ------------------------------------------------------------------------------------------ one class
def one_class_task(tmp_path, split, label):
    folder = write_task(tmp_path / "d")
    rows = [f"{s}\t{label}" for s in SENTENCES[label]]
    (folder / f"{split}.tsv").write_text("\n".join(["sentence\tlabel"] + rows) + "\n")
    return folder


def test_train_refuses_a_training_set_of_one_class(folders, tmp_path, capsys):
    folder = one_class_task(tmp_path, "train", 1)
    err = refused(capsys, tmp_path, folders["opt"], folder)
    assert err == (f"error: train split has only label 1: every example of {folder}/train.tsv is labelled 1; "
                   "nothing to tell apart, add examples of label 0 (or check its label column)")


@pytest.mark.parametrize("split", ["dev", "test"])
def test_train_refuses_a_dev_or_test_file_of_one_class(folders, tmp_path, capsys, split):
    folder = one_class_task(tmp_path, split, 0)
    err = refused(capsys, tmp_path, folders["opt"], folder)
    assert err.startswith(f"error: {split} split has only label 0: every example of {folder}/{split}.tsv is "
                          "labelled 0, so its accuracy counts only how often the model answers 0; give it examples "
                          "of label 1 too"), err


def test_a_training_sample_of_one_class_is_refused_naming_the_flags(tmp_path):
    folder = write_task(tmp_path / "d")
    with pytest.raises(data.DataError, match=r"^train split has only label \d: every example of the 1 of .*train\.tsv "
                                             r"that --num_train 1 and --data_seed 42 take is labelled \d; nothing to "
                                             r"tell apart, ask for more examples or another --data_seed"):
        data.load_splits(str(folder), data.get_task("sst-2"), num_train=1)


def test_a_dev_or_test_sample_of_one_class_is_said_not_refused(tmp_path, capsys):
    folder = write_task(tmp_path / "d")
    splits = data.load_splits(str(folder), data.get_task("sst-2"), num_dev=1, num_test=1)
    assert len(splits["dev"]) == len(splits["test"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == ["warning", "warning"], out
    assert "dev split has only label" in out[0] and "ask for more examples or another --data_seed" in out[0]
    assert "test split has only label" in out[1]


def test_splits_of_both_classes_pass_silently(tmp_path, capsys):
    folder = write_task(tmp_path / "d")
    splits = data.load_splits(str(folder), data.get_task("sst-2"), num_train=10, num_dev=6, num_test=6)
    assert all({ex.label for ex in split} == {0, 1} for split in splits.values())
    assert capsys.readouterr().out == ""
    builtin = data.builtin_splits(data.TINY["seed"])  # the built-in splits have both classes
    assert all({ex.label for ex in split} == {0, 1} for split in builtin.values())
