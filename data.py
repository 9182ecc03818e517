"""What the model reads and how it is scored: tasks, prompts (LM-BFF's for masked LMs, MeZO's for causal LMs), data
files, the prompt-based loss, the batch order, the pretrained model and tokenizer, and the embedded default (task
"toy" and a tiny OPT pretrained once on its corpus and cached: all runs offline)."""
import contextlib
import hashlib
import json
import logging
import os
import random
import string
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

from runs import first_line, save_model


class DataError(ValueError):
    """A problem with the user's inputs (data, task options, model folder), in one line (path:line if any)."""


# ----------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    """A classification task as a prompt: class i is `labels[i]` in the data, `label_words[i]` (LM-BFF's, with a
    leading space) in text; a causal LM appends `causal_label_words` to `causal_template`."""
    name: str
    labels: tuple[str, ...]
    label_words: tuple[str, ...]
    template: str
    causal_template: str | None = None  # None: `template` cut at {mask}
    causal_label_words: tuple[str, ...] | None = None  # None: `label_words`
    text_columns: tuple[str, ...] = ("sentence",)


_SENTIMENT = dict(labels=("0", "1"), label_words=(" terrible", " great"), template="{sentence} It was{mask}.")
TASKS: dict[str, Task] = {name: Task(name, **_SENTIMENT) for name in ("sst-2", "mr", "cr", "mpqa")} | {
    "sst-5": Task("sst-5", labels=("0", "1", "2", "3", "4"),
                  label_words=(" terrible", " bad", " okay", " good", " great"), template="{sentence} It was{mask}."),
    "subj": Task("subj", labels=("0", "1"), label_words=(" subjective", " objective"),
                 template="{sentence} This is{mask}."),
    # LM-BFF puts the mask first, leaving a causal LM nothing to read: our causal prompt (MeZO has no TREC prompt).
    "trec": Task("trec", labels=("0", "1", "2", "3", "4", "5"),
                 label_words=(" Description", " Entity", " Expression", " Human", " Location", " Number"),
                 template="{mask}: {sentence}", causal_template="{sentence} Answer type:"),
    # Masked: LM-BFF's template and words (not its edits of the premise's end and the hypothesis' first letter).
    # Causal: MeZO's prompt, whose answer follows a newline unspaced.
    "rte": Task("rte", labels=("entailment", "not_entailment"), label_words=(" Yes", " No"),
                template="{premise}?{mask}, {hypothesis}",
                causal_template='{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n',
                causal_label_words=("Yes", "No"), text_columns=("premise", "hypothesis")),
    # The built-in task (see `builtin_splits`); lower case because the built-in tokenizer lower-cases.
    "toy": Task("toy", labels=("0", "1"), label_words=(" terrible", " great"), template="{sentence} it was{mask}."),
}


def _placeholders(template: str) -> list[str]:
    """The `{name}` fields of a format string, in order; plain ones only (`{sentence:>200000000}` pads every prompt)."""
    try:
        parsed = [(field, spec, conv) for _, field, spec, conv in string.Formatter().parse(template)
                  if field is not None]
    except ValueError as err:
        raise DataError(f"template {template!r}: {err}") from None
    for field, spec, conv in parsed:
        if spec or conv or not field.isidentifier():
            raise DataError(f"template {template!r}: use plain fields like {{sentence}} and {{mask}}, "
                            f"not {{{field}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}")
    return [field for field, _, _ in parsed]


def parse_label_words(spec: str) -> tuple[str, ...]:
    """Split a comma-separated --label_words value; each word keeps its spaces: " terrible, great"."""
    words = tuple(spec.split(","))
    if any(not w.strip() for w in words):
        raise DataError(f"--label_words {spec!r}: empty label word (give them comma-separated, e.g. ' bad, good')")
    if len(set(words)) < len(words) or len(words) < 2:
        raise DataError(f"--label_words {spec!r}: give at least two different words, one per class")
    return words


def get_task(name: str, template: str | None = None, label_words: str | None = None) -> Task:
    """Task `name` (any case) with --template (also the causal prompt, cut at {mask}) and --label_words. Task
    "custom" needs both: its text columns are the template's fields, its labels "0", "1", ... in word order."""
    key = name.lower()
    if key == "custom":
        if template is None or label_words is None:
            raise DataError("task custom needs both --template and --label_words")
        columns = tuple(f for f in _placeholders(template) if f != "mask")
        words = parse_label_words(label_words)
        task = Task("custom", tuple(str(i) for i in range(len(words))), words, template, text_columns=columns)
    elif key in TASKS:
        task = TASKS[key]
        if template is not None:
            task = replace(task, template=template, causal_template=None, causal_label_words=None)
        if label_words is not None:
            words = parse_label_words(label_words)
            if len(words) != len(task.labels):
                raise DataError(f"--label_words gives {len(words)} words, task {key} has {len(task.labels)} classes")
            task = replace(task, label_words=words, causal_label_words=None)
    else:
        raise DataError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS) + ['custom'])}")
    # the template must use {mask} once and each text column (at least one), and nothing else
    template, columns, fields = task.template, task.text_columns, _placeholders(task.template)
    if fields.count("mask") != 1:
        raise DataError(f"template {template!r} must contain {{mask}} exactly once")
    if not columns:
        raise DataError(f"template {template!r} has no text field such as {{sentence}}: every prompt would be the same")
    unknown = sorted(set(fields) - set(columns) - {"mask"})
    missing = [c for c in columns if c not in fields]
    if unknown or missing:
        raise DataError(f"template {template!r} must use {{{'}, {'.join(columns)}}} and {{mask}}; "
                        f"unknown: {unknown}, missing: {missing}")
    return task


@dataclass(frozen=True)
class Example:
    """One example: its texts in the order of `Task.text_columns`, and its class id."""
    texts: tuple[str, ...]
    label: int


def _fill(template: str, task: Task, ex: Example, **extra: str) -> str:
    return template.format(**dict(zip(task.text_columns, ex.texts)), **extra)


def causal_prompt(task: Task, ex: Example) -> str:
    """The text a causal LM reads before a candidate label word is appended."""
    if task.causal_template is not None:
        return _fill(task.causal_template, task, ex)
    head = task.template.split("{mask}")[0]
    if not set(_placeholders(head)) & set(task.text_columns):
        raise DataError(f"task {task.name}: template {task.template!r} puts {{mask}} before the text, "
                        "so a causal LM needs a causal template")
    return _fill(head, task, ex)


def masked_prompt(task: Task, ex: Example, mask_token: str) -> str:
    """The masked-LM input without special tokens (the tokenizer adds them), e.g. "… It was<mask>."."""
    return _fill(task.template, task, ex, mask=mask_token)


# ----------------------------------------------------------------------------------------------- files
def _read_lines(path: str) -> list[str]:
    """The lines, split on "\n" or "\r\n" only (not on U+0085, U+2028 or form feeds, as in real sentences), no BOM."""
    if os.path.exists(path) and not os.path.isdir(path) and not os.path.isfile(path):  # a FIFO would block
        raise DataError(f"{path}: not a regular file")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        why = {FileNotFoundError: "no such file", IsADirectoryError: "a folder, not a file"}
        raise DataError(f"{path}: {why.get(type(err), f'cannot read ({err.strerror})')}") from None
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if not any(lines):
        raise DataError(f"{path}: empty file")
    if (bad := next((n for n, line in enumerate(lines, start=1) if "\r" in line), None)) is not None:  # old Mac
        raise DataError(f"{path}:{bad}: a carriage return inside a line; lines must end in \\n or \\r\\n")
    return lines


def _check_no_id_column(path: str, lines: list[str], header: list[str], task: Task, headerless: bool) -> None:
    """Columns going by position take the first as text: not when there are more columns than the task reads and
    the first holds only whole numbers (ids, as in "0<tab>good film<tab>1"), which would be read as the text."""
    if len(header) <= len(task.text_columns) + 1:
        return
    firsts = [line.split("\t", 1)[0].strip() for line in lines[0 if headerless else 1:] if line]
    if not firsts or not all(f.isascii() and f.isdigit() for f in firsts):
        return
    example = ", ".join(["idx", *task.text_columns, "label"])
    if headerless:
        raise DataError(f"{path}: {len(header)} columns and no header, the first looks like ids "
                        f"({', '.join(firsts[:3])}...): add a header line naming the columns (e.g. {example})")
    raise DataError(f"{path}:1: the header {header} names no column {', '.join(task.text_columns)} and label, so "
                    f"columns go by position, and the first holds only numbers ({', '.join(firsts[:3])}...), "
                    f"ids rather than text: name the columns in the header (e.g. {example})")


def read_tsv(path: str, task: Task) -> list[Example]:
    """A GLUE-style TSV as Examples of `task`: a header naming the text columns (GLUE RTE's sentence1/2 too) and
    "label", then an example per line, split on tabs, no quoting. Without those names columns go by position (text
    first, label last), and a first line whose label is one of the task's is an example (LM-BFF's files)."""
    lines = _read_lines(path)
    header = lines[0].split("\t")
    if len(header) < len(task.text_columns) + 1:
        raise DataError(f"{path}:1: expected columns {', '.join(task.text_columns)} and label, "
                        f"found {len(header)} tab-separated field(s)")
    names = [h.strip().lower() for h in header]
    aliases = {"premise": ("premise", "sentence1"), "hypothesis": ("hypothesis", "sentence2")}  # GLUE RTE's
    at = [next((names.index(a) for a in aliases.get(c, (c,)) if a in names), None)
          for c in (*task.text_columns, "label")]
    last = header[-1].strip()  # a number is a row's label, not a header's name: if not the task's, it fails below
    headerless = None in at and (last in task.labels or last.lstrip("-").isdigit())
    if None in at:
        _check_no_id_column(path, lines, header, task, headerless)
        at = [*range(len(task.text_columns)), len(header) - 1]
        if not headerless:  # not silent: a header of other names, or a first row whose label is mistyped
            print(f"{path}: first line read as a header {header}; columns by position, label last")
    examples = []
    for number, line in enumerate(lines, start=1):
        if (number == 1 and not headerless) or not line:  # a blank line (e.g. at the end) is not an example
            continue
        fields, where = line.split("\t"), f"{path}:{number}"
        if len(fields) != len(header):
            raise DataError(f"{where}: expected {len(header)} tab-separated columns, got {len(fields)}")
        label, texts = fields[at[-1]].strip(), tuple(fields[i].rstrip() for i in at[:-1])
        if label not in task.labels:
            raise DataError(f"{where}: label {label!r} is not a label of task {task.name} "
                            f"(allowed: {', '.join(task.labels)})")
        empty = [column for column, text in zip(task.text_columns, texts) if not text.strip()]
        if empty:
            raise DataError(f"{where}: empty {empty[0]}")
        examples.append(Example(texts, task.labels.index(label)))
    if not examples:
        raise DataError(f"{path}: no examples after the header")
    return examples


def load_splits(data_dir: str, task: Task, *, k: int | None = None, num_train: int | None = None,
                num_dev: int | None = None, num_test: int | None = None,
                data_seed: int = 42) -> dict[str, list[Example]]:
    """train/dev/test from data_dir/{train,dev,test}.tsv, subsampled with `data_seed`, kept in file order:
    train: k per class (LM-BFF), or num_train at random (MeZO: 1000), else all.
    dev:   num_dev at random (MeZO: 500), else k per class when k is given (LM-BFF), else all.
    test:  num_test at random (MeZO: 1000 of the original validation set), else all; a short split whole."""
    if k is not None and num_train is not None:
        raise DataError("give k (examples per class) or num_train, not both")
    if not os.path.isdir(data_dir):
        raise DataError(f"{data_dir}: no such data folder (expected train.tsv, dev.tsv, test.tsv in it)")
    splits = {s: read_tsv(os.path.join(data_dir, f"{s}.tsv"), task) for s in ("train", "dev", "test")}
    for split, examples in splits.items():
        _check_classes(split, examples, f"{data_dir}/{split}.tsv", task)
    for split, n in {"train": num_train, "dev": num_dev, "test": num_test}.items():
        examples, seed, what = splits[split], f"{split}:{data_seed}", f"{data_dir}/{split}.tsv"  # a str seed: SHA-512
        if n is not None:
            if n > len(examples):  # as MeZO: a split smaller than asked (GLUE SST-2's 872 for 1000) is used whole
                print(f"{what}: {len(examples)} examples, fewer than the {n} asked for; using all of them")
                continue
            chosen = random.Random(seed).sample(range(len(examples)), n)
        elif k is not None and split != "test":  # LM-BFF's k-shot sampling
            chosen = []
            for c, label in enumerate(task.labels):
                members = [i for i, ex in enumerate(examples) if ex.label == c]
                if len(members) < k:
                    raise DataError(f"asked for k={k} examples per class from {what}, it has {len(members)} of "
                                    f"class {label!r}")
                chosen += random.Random(f"{seed}:{label}").sample(members, k)
        else:
            continue
        splits[split] = [examples[i] for i in sorted(chosen)]
        if n is not None:  # k per class takes every class
            sample = f"the {n} of {what} that --num_{split} {n} and --data_seed {data_seed} take"
            _check_classes(split, splits[split], sample, task, sampled=True)
    return splits


def _check_classes(split: str, examples: list[Example], what: str, task: Task, sampled: bool = False) -> None:
    """A split whose examples all have one label. Train: an error, there is nothing to tell apart (the loss is
    least when the model always answers that label). Dev and test: accuracy would count only how often the model
    answers that label, so that one that always does scores 1.0 and the methods cannot be compared: an error for a
    whole file (a file cut from one sorted by label, or placeholder labels as in GLUE's unlabelled test sets), a
    warning for a sample asked small (a quick check may want --num_test 1)."""
    labels = {ex.label for ex in examples}
    if len(labels) != 1:
        return
    only = task.labels[labels.pop()]
    others = ", ".join(label for label in task.labels if label != only)
    if split == "train":
        fix = ("ask for more examples or another --data_seed" if sampled else
               f"add examples of label {others} (or check its label column)")
        raise DataError(f"train split has only label {only}: every example of {what} is labelled {only}; "
                        f"nothing to tell apart, {fix}")
    why = (f"{split} split has only label {only}: every example of {what} is labelled {only}, so its accuracy "
           f"counts only how often the model answers {only}")
    if not sampled:
        raise DataError(f"{why}; give it examples of label {others} too (or check its label column)")
    print(f"warning: {why}; ask for more examples or another --data_seed")


# ------------------------------------------------------------------------------ what the model reads
MAX_LENGTH = 256  # tokens per prompt + label word; LM-BFF and MeZO prompts are far shorter
EVAL_BATCH = 32  # examples per forward pass in evaluation; any value gives the same accuracy


@dataclass
class Encoded:  # a split, tokenised once: prompt token ids and label per example
    prompts: list
    labels: list


def _wide(logits):
    """Logits in at least fp32 (bf16 and fp16 ones are widened), fp64 kept: the loss is never rounded below the model."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


class PromptLoss:
    """The classification loss and accuracy of a prompted LM on a task, shared by every method (LM-BFF for masked
    LMs, MeZO for causal LMs); loss(model, enc, idx) is one forward pass on the examples idx:
      causal: score(c) = mean log p(label word c's tokens | prompt); loss = CE over the candidates' scores.
      masked: score(c) = logit of label word c at the mask; loss = CE over the candidates."""

    def __init__(self, task, tokenizer, kind, device, max_length=MAX_LENGTH):
        self.task, self.tok, self.kind, self.device, self.max_length = task, tokenizer, kind, device, max_length
        self.autocast = None  # a half dtype: every forward runs under torch.autocast (fp32 weights)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        words = (task.causal_label_words or task.label_words) if kind == "causal" else task.label_words
        self.words = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
        for w, ids in zip(words, self.words):
            if not ids:
                raise DataError(f"label word {w!r} is empty after tokenisation")
            if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
                raise DataError(f"label word {w!r} is unknown to this tokenizer (it becomes the unknown token "
                                f"{tokenizer.unk_token!r}): the model cannot score it")
            if kind == "masked" and len(ids) != 1:
                raise DataError(f"label word {w!r} is {len(ids)} tokens for this tokenizer; a masked LM "
                                "needs single-token label words (try a leading space, or another word)")
        if len({tuple(ids) for ids in self.words}) < len(words):
            raise DataError(f"label words {list(words)} are the same tokens for this tokenizer: the classes "
                            "cannot be told apart")
        if kind == "masked" and tokenizer.mask_token is None:
            raise DataError("the tokenizer has no mask token, so the model cannot be used as a masked LM")

    def encode(self, examples):
        """Tokenise a split's prompts once; a prompt too long keeps its end (the words next to the label word)."""
        texts = [causal_prompt(self.task, e) if self.kind == "causal" else
                 masked_prompt(self.task, e, self.tok.mask_token) for e in examples]
        room = self.max_length - max(len(w) for w in self.words)
        prompts = [p if len(p) <= room else p[:1] + p[len(p) - room + 1:] for p in self.tok(texts)["input_ids"]]
        if self.kind == "masked":
            for text, p in zip(texts, prompts):
                if p.count(self.tok.mask_token_id) > 1:
                    raise DataError(f"a text contains the mask token {self.tok.mask_token!r}, so the label "
                                    f"would be read at the wrong place; remove it from the data: {text[:80]!r}")
                if self.tok.mask_token_id not in p:
                    raise DataError("a prompt lost its mask token to truncation; shorten the texts or template")
        if len(examples) > 1 and len({e.texts for e in examples}) == 1:
            raise DataError(f"every example has the same text ({examples[0].texts[0][:60]!r}): nothing to tell apart")
        if len(prompts) > 1 and len({tuple(p) for p in prompts}) == 1:
            raise DataError(f"every prompt is the same after templating and truncation to {self.max_length} "
                            f"tokens ({texts[0][:80]!r}...): the template leaves no room for the text")
        return Encoded(prompts, [e.label for e in examples])

    def _padded(self, seqs, left=False):
        """Model inputs, right-padded, or left-padded (ending together) with position ids unshifted by padding."""
        length = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), length), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for i, s in enumerate(seqs):
            at = slice(length - len(s), None) if left else slice(len(s))
            ids[i, at], mask[i, at] = torch.tensor(s), 1
        inputs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        return inputs | ({"position_ids": (mask.cumsum(1) - 1).clamp_min(0).to(self.device)} if left else {})

    def scores(self, model, prompts):
        """[batch, candidates] scores; the forward pass is the only model call."""
        first = [w[0] for w in self.words]
        # no cast cache: it would keep a half copy of every trained weight until the forward ends (2 bytes a parameter)
        half = torch.autocast(self.device.type, self.autocast, cache_enabled=False) if self.autocast else None
        with half or contextlib.nullcontext():
            if self.kind == "masked":
                inputs = self._padded(prompts)
                at = (inputs["input_ids"] == self.tok.mask_token_id).long().argmax(1)
                return _wide(model(**inputs).logits[torch.arange(len(prompts), device=self.device), at][:, first])
            if all(len(w) == 1 for w in self.words):  # mean log-prob = next-token log-prob: one sequence per example
                logits = model(**self._padded(prompts, left=True), logits_to_keep=1).logits
                return _wide(logits[:, -1]).log_softmax(-1)[:, first]
            # One sequence per (example, candidate), left-padded so that all end with the candidate's tokens: the
            # model only produces the logits of the last (longest word + 1) positions (logits_to_keep).
            keep = max(len(w) for w in self.words) + 1
            seqs = [p + w for p in prompts for w in self.words]
            logits = model(**self._padded(seqs, left=True), logits_to_keep=keep).logits
            logp = _wide(logits[:, :-1]).log_softmax(-1)  # logp[:, j] predicts token length - keep + j + 1
            scores = [logp[i, keep - 1 - len(w):].gather(1, torch.tensor(w, device=self.device)[:, None]).mean()
                      for i, w in enumerate(self.words * len(prompts))]
            return torch.stack(scores).view(len(prompts), len(self.words))

    def loss(self, model, enc, idx):
        labels = torch.tensor([enc.labels[i] for i in idx], device=self.device)
        return torch.nn.functional.cross_entropy(self.scores(model, [enc.prompts[i] for i in idx]), labels)

    @torch.no_grad()
    def score(self, model, enc, idx, batch_size=EVAL_BATCH):
        """Of examples idx of an encoded split: how many the top-scoring candidate gets right, and their summed loss."""
        count, total = 0, 0.0
        for chunk in (idx[start:start + batch_size] for start in range(0, len(idx), batch_size)):
            scores = self.scores(model, [enc.prompts[i] for i in chunk])
            labels = torch.tensor([enc.labels[i] for i in chunk], device=scores.device)
            count += int((scores.argmax(1) == labels).sum())
            total += float(torch.nn.functional.cross_entropy(scores, labels, reduction="sum"))
        return count, total


class Batches:
    """The data order: mini-batch indices, endlessly, from a permutation per epoch (seeded by seed and epoch)."""

    def __init__(self, n, batch_size, seed):
        self.n, self.batch_size, self.seed = n, min(batch_size, n), seed
        self.load_state_dict({"epoch": 0, "pos": 0})

    def next(self):
        if self.pos + self.batch_size > self.n:  # drop the ragged tail: every batch has the same size
            self.load_state_dict({"epoch": self.epoch + 1, "pos": 0})
        self.pos += self.batch_size
        return self.order[self.pos - self.batch_size:self.pos]

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state):
        self.epoch, self.pos = state["epoch"], state["pos"]
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        self.order = torch.randperm(self.n, generator=gen).tolist()


# ------------------------------------------------------------------------------- the pretrained model
# Any Hugging Face causal or masked LM, from the hub or a local folder, with errors a user can act on.
def model_kind(config):
    """'causal' or 'masked', from the config's architectures (none: what its model type supports); else DataError."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING
    archs = " ".join(config.architectures or [])
    if "MaskedLM" in archs:
        return "masked"
    if "CausalLM" in archs or "LMHeadModel" in archs or not archs and type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return "causal"
    if not archs and type(config) in MODEL_FOR_MASKED_LM_MAPPING:
        return "masked"
    raise DataError(f"{config.name_or_path or 'the model'} ({config.model_type}) is neither a causal nor a "
                    "masked language model")


def load_config(name, trust_remote_code):
    from transformers import AutoConfig
    local = Path(name).is_dir()
    if local and not (Path(name) / "config.json").exists():
        raise DataError(f"--model {name}: folder has no config.json, not a Hugging Face model")
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as e:  # a broken folder can fail in many ways; each is one line for the user
        if "custom code" in str(e) or "trust_remote_code" in str(e):
            raise DataError(f"--model {name} needs its own Python code to load; pass --trust_remote_code "
                            "only if you trust it") from None
        if local or not isinstance(e, OSError):
            raise DataError(f"--model {name}: cannot read its config ({first_line(e)})") from None
        raise DataError(f"--model {name}: not a local folder, and the hub could not be reached or has no "
                        "such model (offline?)") from None


def load_tokenizer(name, trust_remote_code):
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise DataError(f"--model {name}: cannot load its tokenizer ({first_line(e)})") from None
    if len(tokenizer) < 3 or not tokenizer("a b")["input_ids"]:  # no tokenizer files: an empty vocabulary
        raise DataError(f"--model {name}: its tokenizer has {len(tokenizer)} token(s); are its tokenizer files "
                        "(tokenizer.json, or vocab and merges) missing?")
    return tokenizer


def model_class(kind):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
    return AutoModelForCausalLM if kind == "causal" else AutoModelForMaskedLM


SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")  # what from_pretrained loads with use_safetensors


def _not_safetensors(name, trust_remote_code):
    """Why `name`'s weights would come from a file other than safetensors (a pickle: torch.load), or None. A local
    folder needs model.safetensors or its sharded index; a config's "transformers_weights" must name one of those."""
    explicit = getattr(load_config(name, trust_remote_code), "transformers_weights", None)
    if explicit is not None and not explicit.endswith((".safetensors", ".safetensors.index.json")):
        return f"its config.json names weights file {explicit}, not a .safetensors file"
    if explicit is None and Path(name).is_dir() and not any((Path(name) / f).is_file() for f in SAFE_WEIGHTS):
        found = sorted(f.name for f in Path(name).iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt", ".h5",
                                                                               ".msgpack", ".safetensors"))
        return f"the folder has no {SAFE_WEIGHTS[0]} (its weight files: {', '.join(found) or 'none'})"
    return None


def _index_pattern(key):
    """A weight's name with every layer index a wildcard: model.layers.#.mlp.up_proj.weight."""
    return ".".join("#" if part.isdigit() else part for part in key.split("."))


def _natural(key):
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in key.split(".")]


def weights_not_taken(model, unexpected):
    """Of the checkpoint's keys the model did not take (transformers' unexpected keys, less those its classes mark
    as ignorable), those that are weights of this architecture: a parameter of a layer past the config's count
    (model.decoder.layers.3.fc1.weight when the config builds 3 layers), or one the config leaves out (a bias its
    module holds as None); a key may lack the model's prefix (decoder.layers.3..., a base model's checkpoint).
    The others are not weights this model could hold, and are left to transformers: buffers older versions saved
    (attn.bias, masked_bias, rotary inv_freq, position_ids), a pooler or pretraining head that a masked LM has not."""
    own = {_index_pattern(f"{module_name}.{p}" if module_name else p)
           for module_name, module in model.named_modules(remove_duplicate=False) for p in module._parameters}
    prefix = getattr(model, "base_model_prefix", "")
    names = lambda key: {key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")} if prefix else {key}  # noqa: E731
    return sorted((k for k in unexpected if names(_index_pattern(k)) & own), key=_natural)


def _convert(name, kind):
    """How to turn a model whose weights are pickles into a folder of safetensors: the folder itself, or for a hub
    name a new local folder (with its tokenizer)."""
    auto, local = model_class(kind).__name__, Path(name).is_dir()
    to = name if local else name.rstrip("/").split("/")[-1] + "-safetensors"
    tokenizer = "" if local else f"; AutoTokenizer.from_pretrained('{name}').save_pretrained('{to}')"
    return (f"only safetensors files are loaded, never a pickle. Convert it once (transformers unpickles it with "
            f"torch.load(weights_only=True), which refuses code): python -c \"from transformers import "
            f"{'AutoTokenizer, ' if tokenizer else ''}{auto}; {auto}.from_pretrained('{name}', use_safetensors=False)"
            f".save_pretrained('{to}'){tokenizer}\"" + ("" if local else f", then pass --model {to}"))


@contextlib.contextmanager
def _held_load_report():
    """Holds back the table of missing and unexpected keys that transformers logs while loading weights: the
    caller release()s it where it lets the model through or fails on its account; a refusal is its one line."""
    logger = logging.getLogger("transformers.modeling_utils")

    class Held(logging.Filter):
        def __init__(self):
            super().__init__()
            self.records = []

        def filter(self, record):
            if "LOAD REPORT" not in str(record.msg):
                return True
            self.records.append(record)
            return False

        def release(self):
            logger.removeFilter(self)
            for record in self.records:
                logger.handle(record)
            self.records.clear()

    held = Held()
    logger.addFilter(held)
    try:
        yield held
    finally:
        logger.removeFilter(held)


def load_model(name, kind, dtype, device, trust_remote_code, device_map=None):
    """The model in eval mode on `device` (or placed by a device_map, e.g. 'auto'); else a DataError in one line.
    Weights come from safetensors files only: a model without them (e.g. pytorch_model.bin alone, a pickle that
    torch.load would unpickle) is refused before any of its weight files is opened, with the command to convert it.
    Every weight of the model must come from the checkpoint, and every weight of the checkpoint must go into the
    model (weights_not_taken: a config.json with fewer layers than the weights is refused, not truncated); every
    tensor finite; not quantised (ZO needs real weights, save_pretrained refuses most)."""
    if why := _not_safetensors(name, trust_remote_code):
        raise DataError(f"--model {name}: cannot load its weights: {why}; {_convert(name, kind)}")
    with _held_load_report() as report:
        try:
            model, info = model_class(kind).from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code,
                                                            device_map=device_map, output_loading_info=True,
                                                            use_safetensors=True)
        except Exception as e:  # corrupt or truncated weights, no safetensors on the hub, shapes that do not match
            report.release()  # e.g. "size mismatch ... look at the above report"
            if "cannot be loaded with `safetensors`" in str(e):  # a hub model whose weights are pickles only
                raise DataError(f"--model {name}: cannot load its weights: the hub has no model.safetensors for "
                                f"it; {_convert(name, kind)}") from None
            raise DataError(f"--model {name}: cannot load its weights ({first_line(e)})") from None
        if info["missing_keys"]:  # transformers would start them at random, said only in its report
            raise DataError(f"--model {name}: its checkpoint lacks {sorted(info['missing_keys'])[0]}")
        if extra := weights_not_taken(model, info["unexpected_keys"]):  # transformers would drop them
            shown = ", ".join(extra[:3]) + (", ..." if len(extra) > 3 else "")
            raise DataError(f"--model {name}: its checkpoint holds {len(extra)} weight(s) the model does not have "
                            f"({shown}): does config.json match the weights (e.g. its number of layers)?")
        report.release()  # keys it ignored, such as a pooler a masked LM has not: said as transformers says them
    if bad := next((n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None):
        raise DataError(f"--model {name}: its weight {bad} holds NaN or inf; a damaged checkpoint")
    if getattr(model, "hf_quantizer", None) is not None:
        raise DataError(f"--model {name} is quantised ({model.hf_quantizer.quantization_config.quant_method}); "
                        "dequantise it to an ordinary float checkpoint first (see the SmolLM2 recipe in RESULTS.md)")
    return (model if device_map else model.to(device)).eval()


def add_lora(model, rank, alpha, targets):
    """`model` in PEFT LoRA adapters on `targets` (None: PEFT's default), only they trainable; B = 0 at first."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise DataError("--lora needs the peft package: pip install peft") from None
    try:
        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0))
    except ValueError as e:
        raise DataError(f"--lora: {first_line(e)}") from None


@dataclass
class Setup:
    """What every method of a run shares; `data_hash` identifies the splits (a resumed run must use the same data)."""
    name: str
    kind: str
    model_type: str
    tokenizer: object
    loss_fn: PromptLoss
    splits: dict
    device: torch.device
    data_hash: str

    @classmethod
    def load(cls, name, task, raw, device, trust_remote_code, projected=False):
        config = load_config(name, trust_remote_code)
        kind = model_kind(config)
        if projected:  # DiZO and --track_divergence need attention matrices that dizo.projected_params finds:
            from dizo import projected_params  # checked on an empty model (no memory, no weights), before any write
            with torch.device("meta"):
                empty = model_class(kind).from_config(config, trust_remote_code=trust_remote_code)
            try:
                projected_params(empty)
            except ValueError as e:
                raise DataError(f"--method dizo / --track_divergence: {e}") from None
        tokenizer = load_tokenizer(name, trust_remote_code)
        # a prompt longer than the model's positions would index past its position table
        max_length = min(MAX_LENGTH, getattr(config, "max_position_embeddings", MAX_LENGTH) - 2)
        loss_fn = PromptLoss(task, tokenizer, kind, device, max_length)
        splits = {s: loss_fn.encode(raw[s]) for s in ("train", "dev", "test")}
        digest = hashlib.sha256(json.dumps([[splits[s].prompts, splits[s].labels] for s in splits]).encode())
        return cls(name, kind, config.model_type, tokenizer, loss_fn, splits, device, digest.hexdigest()[:16])


# ------------------------------------------------------------------------------------- built-in task
# Task "toy": sentiment of short film reviews through SST-2's prompt ("<review> it was" -> " terrible" / " great").
# Three in four turn around ("the plot was dull but the cast was superb"): the label is the main clause's polarity,
# first or last. The pretraining corpus teaches the label words and where a review's verdict lies (reactions), not
# that "it was" should read it there: after a review that turns around comes either word (zero-shot acc. ~0.6).
# Clauses "<aspect> was <adverb><adjective>" or "<aspect> <verb phrase>"; index 0 negative, 1 positive.
# The label words never occur inside a review.
_ASPECTS = ("the acting", "the plot", "the story", "the music", "the ending", "the dialogue", "the script",
            "the pacing", "the cast", "the direction", "the soundtrack", "the humor", "the lead actor",
            "the villain", "the camera work", "the final scene", "the first hour", "this film", "the movie")
_ADVERBS = ("", "really ", "truly ", "very ", "quite ", "so ")
_ADJECTIVES = (("dull", "boring", "clumsy", "bland", "silly", "messy", "weak", "tedious", "flat", "lifeless",
                "stale", "painful", "lazy", "poor", "cheap", "predictable"),
               ("superb", "brilliant", "charming", "moving", "clever", "gripping", "beautiful", "delightful",
                "fresh", "funny", "stunning", "sharp", "warm", "powerful", "smart", "touching"))
_VERB_PHRASES = (("put me to sleep", "made me cringe", "lost my interest", "dragged on forever", "bored me",
                  "left me cold", "fell apart"),
                 ("kept me hooked", "made me smile", "held my attention", "won me over", "made me laugh",
                  "left me in awe", "came together"))
_CONNECTIVES = (" and", " ,")  # between clauses of the same polarity
# Reviews that turn around: {main} is the clause that carries the verdict, {other} the opposite one.
_TURNS = ("{other} but {main}", "although {other} , {main}", "{main} although {other}")
_REACTIONS = (("i hated it", "what a waste of time", "i want my money back", "avoid it", "i walked out early",
               "never again", "two thumbs down"),
              ("i loved it", "i enjoyed every minute", "i would watch it again", "highly recommended",
               "a must see", "i was smiling all the way home", "two thumbs up"))
CLAUSE_COUNTS = (1, 2)   # clauses of a review that does not turn around, drawn uniformly
ADJECTIVE_SHARE = 0.7    # clauses "<aspect> was <adjective>"; the rest "<aspect> <verb phrase>"
TOY_SIZES = {"train": 512, "dev": 200, "test": 500}  # test: 500 examples resolve accuracy to about ±2%
TASK_TURN_SHARE = 0.75   # task reviews that turn around; the rest are already solved by the untuned model
CORPUS_TURN_SHARE = 0.4  # corpus reviews that turn around
REACTION_SHARE = 0.3     # corpus lines "<review> . <reaction>"; the rest "<review> it was <label word>"


def _clause(rng: random.Random, polarity: int) -> str:
    aspect = rng.choice(_ASPECTS)
    if rng.random() < ADJECTIVE_SHARE:
        return f"{aspect} was {rng.choice(_ADVERBS)}{rng.choice(_ADJECTIVES[polarity])}"
    return f"{aspect} {rng.choice(_VERB_PHRASES[polarity])}"


def _review(rng: random.Random, polarity: int, turns: bool) -> str:
    """A review whose main clause has that polarity: one that turns around, or 1 or 2 clauses of that polarity."""
    if turns:
        return rng.choice(_TURNS).format(main=_clause(rng, polarity), other=_clause(rng, 1 - polarity))
    text = _clause(rng, polarity)
    for _ in range(rng.choice(CLAUSE_COUNTS) - 1):
        text += f"{rng.choice(_CONNECTIVES)} {_clause(rng, polarity)}"
    return text


def builtin_splits(seed: int = 0) -> dict[str, list[Example]]:
    """train/dev/test of task "toy": distinct reviews, no sentence in two splits, classes balanced."""
    rng = random.Random(f"toy:{seed}")
    seen, splits = set(), {}
    for split, size in TOY_SIZES.items():
        examples = []
        while len(examples) < size:
            label = len(examples) % 2
            text = _review(rng, label, turns=rng.random() < TASK_TURN_SHARE)
            if text not in seen:
                seen.add(text)
                examples.append(Example((text,), label))
        rng.shuffle(examples)
        splits[split] = examples
    return splits


def builtin_corpus(seed: int = 0, n: int = 20000) -> list[str]:
    """Pretraining text for the built-in tiny LM (about 150 words); it holds no review of task "toy"."""
    rng = random.Random(f"corpus:{seed}")
    avoid = {ex.texts[0] for split in builtin_splits(seed).values() for ex in split}
    corpus = []
    for _ in range(n):
        polarity, turns = rng.randrange(2), rng.random() < CORPUS_TURN_SHARE
        review = _review(rng, polarity, turns)
        while review in avoid:
            review = _review(rng, polarity, turns)
        if rng.random() < REACTION_SHARE:
            corpus.append(f"{review} . {rng.choice(_REACTIONS[polarity])}")
        else:  # after a review that turns around, either word (the toy task's, with their leading space)
            corpus.append(f"{review} it was{TASKS['toy'].label_words[rng.randrange(2) if turns else polarity]}")
    return corpus


def build_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over the corpus's words, shaped like OPT's: every sequence starts
    with "</s>" (OPT's bos = eos), none ends with it. Ids are fixed by word frequency, ties alphabetical."""
    normalizer, pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    counts = Counter(w for line in corpus for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)))
    words = sorted(counts, key=lambda w: (-counts[w], w))
    # ids 0-2 as OPTConfig's defaults: pad 1, bos = eos 2
    vocab = {token: i for i, token in enumerate(("<unk>", "<pad>", "</s>", "<mask>") + tuple(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B",
                                                       special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", mask_token="<mask>")


# ------------------------------------------------------------------------------- the embedded model
# A tiny OPT pretrained on builtin_corpus(), shipped as a Hugging Face folder (tiny-opt/, 2.5 MB): it loads like
# facebook/opt-125m. It ships as weights because pretraining rounds differently on every CPU and thread count, and
# the model it ends at differs (float64 does not help: 800 AdamW steps amplify the last bit); from one set of weights
# every machine prints the same quick-start table. `python data.py --rebuild-tiny-opt FOLDER` pretrains it anew.
# Peak learning rate 1e-3: at 3e-3 the 800 steps can end without the link from polarity to the label words.
TINY = dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, ffn_dim=512,
            max_position_embeddings=64, pretrain_steps=800, pretrain_lr=1e-3, pretrain_batch=32, seed=0)
TINY_DIR = Path(__file__).resolve().parent / "tiny-opt"
TINY_SHA256 = "a40d87aebee84d67285307abccdf94b0451fbce96aa3a9a1aa414bc5485247ea"  # of TINY_DIR/model.safetensors


def pretrain_tiny_opt(corpus):
    """(model, tokenizer, last loss): the tiny OPT pretrained with AdamW on the built-in corpus, on one thread, bit
    for bit the same with the same torch and CPU kernels (other summation orders can grow into an untunable model)."""
    from transformers import OPTConfig, OPTForCausalLM
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(TINY["seed"])
        tokenizer = build_tokenizer(corpus)
        shape = ("hidden_size", "num_hidden_layers", "ffn_dim", "num_attention_heads", "max_position_embeddings")
        model = OPTForCausalLM(OPTConfig(
            vocab_size=len(tokenizer), word_embed_proj_dim=TINY["hidden_size"], dropout=0.0, attention_dropout=0.0,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, **{k: TINY[k] for k in shape}))
        opt = torch.optim.AdamW(model.parameters(), lr=TINY["pretrain_lr"], weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=TINY["pretrain_lr"], total_steps=TINY["pretrain_steps"])
        order = torch.Generator().manual_seed(TINY["seed"])
        bar = tqdm(range(TINY["pretrain_steps"]), desc="pretraining the tiny OPT", leave=False)
        for _ in bar:
            idx = torch.randint(len(corpus), (TINY["pretrain_batch"],), generator=order).tolist()
            enc = tokenizer([corpus[i] for i in idx], return_tensors="pt", padding=True)
            loss = model(**enc, labels=enc.input_ids.masked_fill(enc.attention_mask == 0, -100)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    finally:
        torch.set_num_threads(threads)
    return model, tokenizer, loss.item()


def builtin_model() -> str:
    """The shipped tiny OPT's folder, its weights checked: a changed file would print other numbers than the README."""
    weights = TINY_DIR / "model.safetensors"
    try:
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    except OSError as e:
        raise DataError(f"the embedded model {weights} cannot be read ({e.strerror}); restore it: git checkout -- "
                        f"{TINY_DIR.name}") from None
    if digest != TINY_SHA256:
        raise DataError(f"the embedded model {weights} is not the one shipped (sha256 {digest[:12]}..., expected "
                        f"{TINY_SHA256[:12]}...); restore it (git checkout -- {TINY_DIR.name}), or give a rebuilt "
                        "one as --model FOLDER")
    return str(TINY_DIR)


def rebuild_tiny_opt(folder):
    """Pretrain the tiny OPT anew into `folder`. Its weights differ by CPU and thread count, and so do the numbers a
    run of it prints: python train.py --model FOLDER runs the built-in task on it."""
    model, tokenizer, loss = pretrain_tiny_opt(builtin_corpus(TINY["seed"]))
    save_model(model, tokenizer, Path(folder))
    digest = hashlib.sha256((Path(folder) / "model.safetensors").read_bytes()).hexdigest()
    print(f"tiny OPT: {sum(p.numel() for p in model.parameters()):,} parameters, pretrained {TINY['pretrain_steps']} "
          f"steps, final LM loss {loss:.3f}, saved to {folder} (model.safetensors sha256 {digest})")


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Rebuild the embedded tiny OPT (train.py ships it as tiny-opt/).")
    parser.add_argument("--rebuild-tiny-opt", metavar="FOLDER", required=True, help="where to save the new model")
    rebuild_tiny_opt(parser.parse_args().rebuild_tiny_opt)
