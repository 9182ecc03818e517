"""What the model reads and how it is scored: tasks, prompts, data files, the prompt-based loss, the batch order,
each process's share of a batch under torchrun, the pretrained model and its tokenizer, the embedded default (a
built-in task, its corpus and the tiny model pretrained on it); and the files a run writes (results,
checkpoints, saved models), each write atomic.

* Real tasks: GLUE-style TSV files `train.tsv`, `dev.tsv`, `test.tsv` in one folder. The first line is a
  header; columns are found by name ("sentence", or "premise"/"hypothesis" -- GLUE RTE's "sentence1"/"sentence2"
  are accepted as aliases -- and "label"). A header without these names falls back to positions: the text
  column(s) first, the label last. Fields are split on tabs, with no quoting (as GLUE writes them). LM-BFF ships
  MR, CR, MPQA, Subj, SST-5 and TREC as headerless CSV; convert them to this format first.
* Prompts and labels follow LM-BFF (Gao et al., 2021) for masked LMs and MeZO (Malladi et al., 2023) for causal
  LMs: a causal LM scores each candidate label word appended to `causal_prompt(task, ex)` (the mean
  log-probability of its tokens); a masked LM reads the logits of the label words at the mask of
  `masked_prompt(task, ex, mask_token)`. Templates are `str.format` strings with one placeholder per text column
  and `{mask}`. `PromptLoss` turns either score into a cross-entropy over the candidates.
* The embedded default: task "toy", a small sentiment task with a matching pretraining corpus, generated from a
  seeded `random.Random`, and a tiny OPT pretrained on that corpus once and cached as an ordinary Hugging Face
  folder (`builtin_model`), so that the whole pipeline runs offline.
"""
import contextlib
import hashlib
import json
import os
import random
import shutil
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast


class DataError(ValueError):
    """A problem with the user's inputs (data files, task options, model folder); the message is one line, with
    path:line where there is one."""


# ----------------------------------------------------------------------------------------------- tasks

@dataclass(frozen=True)
class Task:
    """A classification task as a prompt: class i is `labels[i]` in the data and `label_words[i]` in text.

    Masked-LM label words carry a leading space, as LM-BFF's do (it tokenizes " " + word for every task,
    TREC's included). A causal LM appends `causal_label_words` (default: `label_words`) to the causal
    prompt: `causal_template`, or `template` cut at `{mask}` when it is None.
    """
    name: str
    labels: tuple[str, ...]
    label_words: tuple[str, ...]
    template: str
    causal_template: str | None = None
    causal_label_words: tuple[str, ...] | None = None
    text_columns: tuple[str, ...] = ("sentence",)

    @property
    def causal_words(self) -> tuple[str, ...]:
        """The words a causal LM appends to `causal_prompt`, one per class."""
        return self.causal_label_words or self.label_words


_SENTIMENT = dict(labels=("0", "1"), label_words=(" terrible", " great"), template="{sentence} It was{mask}.")

TASKS: dict[str, Task] = {
    "sst-2": Task("sst-2", **_SENTIMENT),
    "mr": Task("mr", **_SENTIMENT),
    "cr": Task("cr", **_SENTIMENT),
    "mpqa": Task("mpqa", **_SENTIMENT),
    "sst-5": Task("sst-5", labels=("0", "1", "2", "3", "4"),
                  label_words=(" terrible", " bad", " okay", " good", " great"), template="{sentence} It was{mask}."),
    "subj": Task("subj", labels=("0", "1"), label_words=(" subjective", " objective"),
                 template="{sentence} This is{mask}."),
    # LM-BFF puts the mask first, so cutting at it leaves a causal LM nothing to read: the causal prompt
    # is our choice (MeZO has no TREC prompt).
    "trec": Task("trec", labels=("0", "1", "2", "3", "4", "5"),
                 label_words=(" Description", " Entity", " Expression", " Human", " Location", " Number"),
                 template="{mask}: {sentence}", causal_template="{sentence} Answer type:"),
    # Masked: LM-BFF's template and words (it also drops the premise's last character and lower-cases the
    # hypothesis' first letter; we do not). Causal: MeZO's prompt, whose answer follows a newline unspaced.
    "rte": Task("rte", labels=("entailment", "not_entailment"), label_words=(" Yes", " No"),
                template="{premise}?{mask}, {hypothesis}",
                causal_template='{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n',
                causal_label_words=("Yes", "No"), text_columns=("premise", "hypothesis")),
    # The built-in task (see `builtin_splits`); lower case because the built-in tokenizer lower-cases.
    "toy": Task("toy", labels=("0", "1"), label_words=(" terrible", " great"), template="{sentence} it was{mask}."),
}


def _placeholders(template: str) -> list[str]:
    """The `{name}` fields of a format string, in order of appearance; only plain fields are allowed (a format
    spec such as `{sentence:>200000000}` would pad every prompt, a conversion would quote it)."""
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


def _check_template(template: str, text_columns: tuple[str, ...]) -> None:
    """A template must use {mask} once and each text column (at least one), and nothing else."""
    fields = _placeholders(template)
    if fields.count("mask") != 1:
        raise DataError(f"template {template!r} must contain {{mask}} exactly once")
    if not text_columns:
        raise DataError(f"template {template!r} has no text field such as {{sentence}}: every prompt would be the "
                        "same")
    unknown = sorted(set(fields) - set(text_columns) - {"mask"})
    missing = [c for c in text_columns if c not in fields]
    if unknown or missing:
        raise DataError(f"template {template!r} must use {{{'}, {'.join(text_columns)}}} and {{mask}}; "
                        f"unknown: {unknown}, missing: {missing}")


def parse_label_words(spec: str) -> tuple[str, ...]:
    """Split a comma-separated --label_words value; each word keeps its spaces: " terrible, great"."""
    words = tuple(spec.split(","))
    if any(not w.strip() for w in words):
        raise DataError(f"--label_words {spec!r}: empty label word (give them comma-separated, e.g. ' bad, good')")
    if len(set(words)) < len(words) or len(words) < 2:
        raise DataError(f"--label_words {spec!r}: give at least two different words, one per class")
    return words


def get_task(name: str, template: str | None = None, label_words: str | None = None) -> Task:
    """The task called `name` (any case), with --template / --label_words overrides applied.

    `label_words` is one string, comma-separated, spaces kept: " terrible, great" gives (" terrible", " great").
    A template override also becomes the causal prompt (cut at {mask}). Task "custom" needs both: its
    text columns are the template's placeholders, its labels "0", "1", ... in the order of the words.
    """
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
            task = Task(task.name, task.labels, task.label_words, template, text_columns=task.text_columns)
        if label_words is not None:
            words = parse_label_words(label_words)
            if len(words) != len(task.labels):
                raise DataError(f"--label_words gives {len(words)} words, task {key} has {len(task.labels)} classes")
            task = Task(task.name, task.labels, words, task.template, task.causal_template,
                        text_columns=task.text_columns)
    else:
        raise DataError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS) + ['custom'])}")
    _check_template(task.template, task.text_columns)
    return task


@dataclass(frozen=True)
class Example:
    """One example: its texts in the order of `Task.text_columns`, and its class id."""
    texts: tuple[str, ...]
    label: int


def _fill(template: str, task: Task, ex: Example, **extra: str) -> str:
    return template.format(**dict(zip(task.text_columns, ex.texts)), **extra)


def causal_prompt(task: Task, ex: Example) -> str:
    """The text a causal LM reads before a candidate from `task.causal_words` is appended."""
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

# Header names that identify a text column (GLUE RTE writes sentence1/sentence2).
_ALIASES = {"premise": ("premise", "sentence1"), "hypothesis": ("hypothesis", "sentence2")}


def _column_positions(header: list[str], task: Task) -> tuple[list[int], int] | None:
    """Positions of the text columns and of the label, by header name; None if the names are not there."""
    names = [h.strip().lower() for h in header]

    def find(column: str) -> int | None:
        return next((names.index(a) for a in _ALIASES.get(column, (column,)) if a in names), None)

    texts, label = [find(c) for c in task.text_columns], find("label")
    return (texts, label) if None not in texts and label is not None else None


def _read_lines(path: str) -> list[str]:
    """The file's lines, split on "\n" alone (and "\r\n"): real sentences contain U+0085, U+2028 or form feeds,
    which str.splitlines would take for line ends. A byte-order mark before the header is dropped."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: a folder, not a file") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if not any(lines):
        raise DataError(f"{path}: empty file")
    return lines


def _parse_row(fields: list[str], task: Task, text_at: list[int], label_at: int) -> Example:
    """One TSV row as an Example; the DataError it raises lacks the path:line its caller adds."""
    label = fields[label_at].strip()
    if label not in task.labels:
        raise DataError(f"label {label!r} is not a label of task {task.name} (allowed: {', '.join(task.labels)})")
    texts = tuple(fields[i].rstrip() for i in text_at)
    for column, text in zip(task.text_columns, texts):
        if not text.strip():
            raise DataError(f"empty {column}")
    return Example(texts, task.labels.index(label))


def read_tsv(path: str, task: Task) -> list[Example]:
    """Read a GLUE-style TSV into Examples of `task`: a header naming the columns, then one example per line.
    Without those names, columns go by position (text first, label last), and a first line whose label field is
    one of the task's labels is an example, not a header (LM-BFF-style files have none)."""
    lines = _read_lines(path)
    header = lines[0].split("\t")
    if len(header) < len(task.text_columns) + 1:
        raise DataError(f"{path}:1: expected columns {', '.join(task.text_columns)} and label, "
                        f"found {len(header)} tab-separated field(s)")
    positions = _column_positions(header, task)
    headerless = positions is None and header[-1].strip() in task.labels
    text_at, label_at = positions or (list(range(len(task.text_columns))), len(header) - 1)
    examples = []
    for number, line in enumerate(lines, start=1):
        if (number == 1 and not headerless) or not line:  # a blank line (e.g. at the end) is not an example
            continue
        try:
            fields = line.split("\t")
            if len(fields) != len(header):
                raise DataError(f"expected {len(header)} tab-separated columns, got {len(fields)}")
            examples.append(_parse_row(fields, task, text_at, label_at))
        except DataError as err:
            raise DataError(f"{path}:{number}: {err}") from None
    if not examples:
        raise DataError(f"{path}: no examples after the header")
    return examples


def _sample(examples: list[Example], n: int, seed: str, what: str) -> list[Example]:
    """n examples drawn without replacement, kept in file order; `seed` is a string so that the draw does
    not depend on Python's hash seed (random.Random hashes strings with SHA-512)."""
    if n > len(examples):
        raise DataError(f"asked for {n} examples from {what}, it has {len(examples)}")
    return [examples[i] for i in sorted(random.Random(seed).sample(range(len(examples)), n))]


def _sample_per_class(examples: list[Example], k: int, task: Task, seed: str, what: str) -> list[Example]:
    """k examples of each class (LM-BFF's k-shot sampling), kept in file order."""
    chosen = []
    for c, label in enumerate(task.labels):
        members = [i for i, ex in enumerate(examples) if ex.label == c]
        if len(members) < k:
            raise DataError(f"asked for k={k} examples per class from {what}, it has {len(members)} of class {label!r}")
        chosen += random.Random(f"{seed}:{label}").sample(members, k)
    return [examples[i] for i in sorted(chosen)]


def load_splits(data_dir: str, task: Task, *, k: int | None = None, num_train: int | None = None,
                num_dev: int | None = None, num_test: int | None = None,
                data_seed: int = 42) -> dict[str, list[Example]]:
    """train/dev/test from data_dir/{train,dev,test}.tsv, subsampled with `data_seed`.

    train: k per class (LM-BFF), or num_train at random (MeZO: 1000), else all.
    dev:   num_dev at random (MeZO: 500), else k per class when k is given (LM-BFF), else all.
    test:  num_test at random (MeZO: 1000 of the original validation set), else all.
    Each split has its own random stream, so changing one size leaves the other draws as they were.
    """
    if k is not None and num_train is not None:
        raise DataError("give k (examples per class) or num_train, not both")
    if not os.path.isdir(data_dir):
        raise DataError(f"{data_dir}: no such data folder (expected train.tsv, dev.tsv, test.tsv in it)")
    splits = {s: read_tsv(os.path.join(data_dir, f"{s}.tsv"), task) for s in ("train", "dev", "test")}
    sizes = {"train": num_train, "dev": num_dev, "test": num_test}
    for split, examples in splits.items():
        seed = f"{split}:{data_seed}"
        if sizes[split] is not None:
            splits[split] = _sample(examples, sizes[split], seed, f"{data_dir}/{split}.tsv")
        elif k is not None and split != "test":
            splits[split] = _sample_per_class(examples, k, task, seed, f"{data_dir}/{split}.tsv")
    return splits


def write_atomically(path, write) -> None:
    """write(tmp) creates a file or a folder at a temporary name, which then takes the place of `path` by rename:
    a kill at any moment leaves the old or the new one whole, never half (an old folder is renamed aside first,
    then removed; `checkpoint_dir` knows that name)."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    remove(tmp)
    write(tmp)
    if path.is_dir():
        remove(old)
        os.replace(path, old)
        os.replace(tmp, path)
        remove(old)
    else:
        os.replace(tmp, path)


def remove(path: Path) -> None:
    """Delete a file or a folder tree, if there is one."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# ------------------------------------------------------------------------------ what the model reads
#
# The prompt-based classification loss, shared by every method (LM-BFF for masked LMs, MeZO for causal LMs):
#   causal: score(c) = mean log p(label word c's tokens | prompt); loss = CE over the candidates' scores.
#   masked: score(c) = logit of label word c at the mask; loss = CE over the candidates.

MAX_LENGTH = 256  # tokens per prompt + label word; LM-BFF and MeZO prompts are far shorter
EVAL_BATCH = 32  # examples per forward pass in evaluation; any value gives the same accuracy


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
        self.autocast = None  # a half dtype: the forward runs under torch.autocast (fp32 weights, FO)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        words = task.causal_words if kind == "causal" else task.label_words
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
        """Tokenise the prompts of a split once; keeps the end of a prompt that is too long."""
        if self.kind == "causal":
            texts = [causal_prompt(self.task, e) for e in examples]
        else:
            texts = [masked_prompt(self.task, e, self.tok.mask_token) for e in examples]
        ids = self.tok(texts)["input_ids"]
        room = self.max_length - max(len(w) for w in self.words)
        # Keep the end of a long prompt: the template's words next to the label word matter most.
        prompts = [p if len(p) <= room else p[:1] + p[len(p) - room + 1:] for p in ids]
        if self.kind == "masked":
            for text, p in zip(texts, prompts):
                if p.count(self.tok.mask_token_id) > 1:
                    raise DataError(f"a text contains the mask token {self.tok.mask_token!r}, so the label "
                                    f"would be read at the wrong place; remove it from the data: {text[:80]!r}")
                if self.tok.mask_token_id not in p:
                    raise DataError("a prompt lost its mask token to truncation; shorten the texts or template")
        if len(prompts) > 1 and len({tuple(p) for p in prompts}) == 1:
            raise DataError(f"every prompt is the same after templating and truncation to {self.max_length} "
                            f"tokens ({texts[0][:80]!r}...): the template leaves no room for the text")
        return Encoded(prompts, [e.label for e in examples])

    def scores(self, model, prompts):
        """[batch, candidates] scores; the forward pass is the only model call."""
        with torch.autocast(self.device.type, self.autocast) if self.autocast else contextlib.nullcontext():
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
    def correct(self, model, enc, idx=None, batch_size=EVAL_BATCH):
        """How many examples (all, or those in idx) have the label as their highest-scoring candidate."""
        idx = range(len(enc.labels)) if idx is None else idx
        count = 0
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            pred = self.scores(model, [enc.prompts[i] for i in chunk]).argmax(1).cpu()
            count += int((pred == torch.tensor([enc.labels[i] for i in chunk])).sum())
        return count

    def accuracy(self, model, enc):
        """Share of examples whose highest-scoring candidate is the label."""
        return self.correct(model, enc) / len(enc.labels)


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


# ------------------------------------------------------------------ which examples this process reads
#
# Data parallelism under torchrun. Every rank draws the same global mini-batch (same seed) and evaluates its
# share, idx[rank::world]; one all-reduce of (Σ loss, count) gives every rank the global mean, so ZO's ℓ+ and
# ℓ- (and the γ search's) are the same everywhere, and so are g, z (regenerated from the shared seed) and the
# update: a ZO step costs one all-reduce of two scalars per forward pass and no gradient traffic. FO uses
# DistributedDataParallel. A process started without torchrun is a world of one, and every method is a no-op.

class Ranks:
    """This process's place in the run (`world`, `rank`, `main`), its `device`, and the collectives."""

    def __init__(self):
        self.device = torch.device("cpu")

    # torchrun's environment (the env:// rendezvous) says where this process stands
    world = property(lambda self: int(os.environ.get("WORLD_SIZE", 1)))
    rank = property(lambda self: int(os.environ.get("RANK", 0)))
    main = property(lambda self: self.rank == 0)

    def start(self):
        """Join the process group (NCCL between GPUs, one per process; gloo on CPUs); returns the device."""
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.world == 1:
            return self.device
        import datetime
        import torch.distributed as dist

        if self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        # a rank that dies leaves the others waiting in an all-reduce: they give up after the timeout
        dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=10))
        return self.device

    def stop(self):
        if self.world > 1:
            torch.distributed.destroy_process_group()

    def shard(self, idx):
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


# ------------------------------------------------------------------------------- the pretrained model
#
# Any Hugging Face causal or masked LM, from the hub or a local folder, with errors a user can act on.

def model_kind(config):
    """'causal' or 'masked', from the config's architecture; DataError for anything else."""
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
    raise DataError(f"{config.name_or_path or 'the model'} ({config.model_type}) is neither a causal nor a "
                     "masked language model")


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def load_config(name, trust_remote_code):
    """The model's config from a local folder or the hub, with one-line errors for the usual mistakes."""
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
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise DataError(f"--model {name}: cannot load its tokenizer ({first_line(e)})") from None


def model_class(kind):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    return AutoModelForCausalLM if kind == "causal" else AutoModelForMaskedLM


def load_model(name, kind, dtype, device, trust_remote_code, device_map=None):
    """The model, in eval mode. Weights load through safetensors, or torch.load with weights_only=True, as
    transformers does by default: never an arbitrary pickle. A quantised model is refused: ZO updates need
    real-valued weights, and checkpoints need save_pretrained, which refuses most quantisations. With a
    device_map ('auto'), accelerate places the layers across the devices instead of `device`."""
    try:
        model = model_class(kind).from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code,
                                                  device_map=device_map)
    except Exception as e:  # corrupt or truncated weights, a blocked pickle, shapes that do not match the config
        raise DataError(f"--model {name}: cannot load its weights ({first_line(e)})") from None
    if getattr(model, "hf_quantizer", None) is not None:
        raise DataError(f"--model {name} is quantised ({model.hf_quantizer.quantization_config.quant_method}); "
                        "dequantise it to an ordinary float checkpoint first (see the SmolLM2 recipe in README)")
    return (model if device_map else model.to(device)).eval()


def check_projectable(config, kind, trust_remote_code):
    """DiZO and --track_divergence need attention matrices that dizo.projected_params can find: checked on an
    empty model on the meta device (no memory, no weights read), before anything is trained or written."""
    from dizo import projected_params

    with torch.device("meta"):
        model = model_class(kind).from_config(config, trust_remote_code=trust_remote_code)
    try:
        projected_params(model)
    except ValueError as e:
        raise DataError(f"--method dizo / --track_divergence: {e}") from None


def add_lora(model, rank, alpha, targets):
    """`model` in PEFT LoRA adapters on `targets` (None: PEFT's default modules for the model), only they
    trainable; B = 0, so it computes the same function at first. PEFT is an optional dependency: the
    ecosystem's standard for adapters."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise DataError("--lora needs the peft package: pip install peft") from None
    try:
        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                                lora_dropout=0.0))
    except ValueError as e:
        raise DataError(f"--lora: {first_line(e)}") from None


@dataclass
class Setup:
    """What every method of a run shares: the model's name, kind and type, its tokenizer, the loss and the
    encoded splits, on `device`; `data_hash` identifies the splits (a resumed run must train on the same data)."""
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
        """Read model `name`'s config (it says the kind) and tokenizer, and encode the `raw` splits of `task`;
        with `projected`, check that DiZO finds the matrices it projects."""
        config = load_config(name, trust_remote_code)
        kind = model_kind(config)
        if projected:
            check_projectable(config, kind, trust_remote_code)
        tokenizer = load_tokenizer(name, trust_remote_code)
        # a prompt longer than the model's positions would index past its position table
        max_length = min(MAX_LENGTH, getattr(config, "max_position_embeddings", MAX_LENGTH) - 2)
        loss_fn = PromptLoss(task, tokenizer, kind, device, max_length)
        splits = {s: loss_fn.encode(raw[s]) for s in ("train", "dev", "test")}
        digest = hashlib.sha256(json.dumps([[splits[s].prompts, splits[s].labels] for s in splits]).encode())
        return cls(name, kind, config.model_type, tokenizer, loss_fn, splits, device, digest.hexdigest()[:16])


# ------------------------------------------------------------------------------------- built-in task
#
# Task "toy" is binary sentiment on short film reviews, read through SST-2's prompt ("<review> it was" ->
# " terrible" / " great"). Three reviews in four turn around: one clause says the opposite of the other ("the
# plot was dull but the cast was superb", "although the plot was dull , ...", "... although the plot was
# dull"), and the label is the polarity of the main clause, which sits first or last. The corpus that
# pretrains the tiny model is built so that the model knows the label words and where a review's verdict lies,
# but not that "it was" should read it there -- so fine-tuning has to change where the last position attends:
#  * After reviews that do not turn around, "it was" is followed by the label word of their polarity: the
#    label words are aligned before any fine-tuning, and only reviews that turn around are left to learn.
#  * Reviews are also followed by reactions ("i loved it", "what a waste of time") of the main clause's
#    polarity: the model learns to find the main clause, but only where a reaction follows.
#  * After a review that turns around, "it was" is followed by either label word (a coin flip): the untuned
#    model is unsure there (zero-shot accuracy about 0.6 on the task), and no word-level bias can fix it.
# The main clause is the first or the last one, so reading "the end of the review" (e.g. through the learned
# positions) does not solve the task.

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
_LABEL_WORDS = ("terrible", "great")

CLAUSE_COUNTS = (1, 2)   # clauses of a review that does not turn around, drawn uniformly
ADJECTIVE_SHARE = 0.7    # clauses "<aspect> was <adjective>"; the rest "<aspect> <verb phrase>"
TOY_SIZES = {"train": 512, "dev": 200, "test": 500}  # test: 500 examples resolve accuracy to about ±2%
TASK_TURN_SHARE = 0.75   # task reviews that turn around; the rest are already solved by the untuned model
CORPUS_TURN_SHARE = 0.4  # corpus reviews that turn around
REACTION_SHARE = 0.3     # corpus lines "<review> . <reaction>"; the rest "<review> it was <label word>"


def _clause(rng: random.Random, polarity: int) -> str:
    """One clause of the given polarity."""
    aspect = rng.choice(_ASPECTS)
    if rng.random() < ADJECTIVE_SHARE:
        return f"{aspect} was {rng.choice(_ADVERBS)}{rng.choice(_ADJECTIVES[polarity])}"
    return f"{aspect} {rng.choice(_VERB_PHRASES[polarity])}"


def _review(rng: random.Random, polarity: int, turns: bool) -> str:
    """A review whose main clause has the given polarity: one that turns around (see _TURNS), or 1 or 2
    clauses of that polarity."""
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


def _corpus_line(rng: random.Random, avoid: set[str]) -> str:
    """One pretraining sentence; its review is not in `avoid`."""
    polarity, turns = rng.randrange(2), rng.random() < CORPUS_TURN_SHARE
    review = _review(rng, polarity, turns)
    while review in avoid:
        review = _review(rng, polarity, turns)
    if rng.random() < REACTION_SHARE:
        return f"{review} . {rng.choice(_REACTIONS[polarity])}"
    word = rng.randrange(2) if turns else polarity  # a review that turns around: either word
    return f"{review} it was {_LABEL_WORDS[word]}"


def builtin_corpus(seed: int = 0, n: int = 20000) -> list[str]:
    """Pretraining text for the built-in tiny LM (about 150 words); it holds no review of task "toy"."""
    rng = random.Random(f"corpus:{seed}")
    task_texts = {ex.texts[0] for split in builtin_splits(seed).values() for ex in split}
    return [_corpus_line(rng, task_texts) for _ in range(n)]


# ------------------------------------------------------------------------------- built-in tokenizer

SPECIAL_TOKENS = ("<unk>", "<pad>", "</s>", "<mask>")  # ids 0-2 as OPTConfig's defaults: pad 1, bos = eos 2


def build_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over the corpus's words, shaped like OPT's: every sequence starts
    with "</s>" (OPT's bos = eos), none ends with it. Ids are fixed by word frequency, ties alphabetical."""
    normalizer = normalizers.Lowercase()
    pre_tokenizer = pre_tokenizers.Whitespace()
    counts = Counter(word for line in corpus
                     for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)))
    words = sorted(counts, key=lambda w: (-counts[w], w))
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B",
                                                       special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", mask_token="<mask>")


# ------------------------------------------------------------------------------- the embedded model
#
# A tiny OPT pretrained here, once, on builtin_corpus(), and cached as an ordinary Hugging Face folder, so that
# it loads through the same from_pretrained path as facebook/opt-125m. Peak learning rate 1e-3: at 3e-3 the
# 800 steps on this corpus can end without the link from a review's polarity to the label words.

TINY = dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, ffn_dim=512,
            max_position_embeddings=64, pretrain_steps=800, pretrain_lr=1e-3, pretrain_batch=32, seed=0)


def cache_root() -> Path:
    """Where the embedded model is cached: $DIZO_CACHE, else ~/.cache/dizo."""
    return Path(os.environ.get("DIZO_CACHE", Path.home() / ".cache" / "dizo"))


def builtin_model_dir():
    """Where the embedded model lives; the name changes whenever its recipe or corpus changes."""
    corpus = builtin_corpus(TINY["seed"])
    key = hashlib.sha256(json.dumps([TINY, corpus[:50], len(corpus)]).encode()).hexdigest()[:12]
    return cache_root() / f"tiny-opt-{key}"


def pretrain_tiny_opt():
    """The tiny OPT pretrained with AdamW on the built-in corpus (next-token loss); (model, tokenizer, last loss).

    On one thread: a matmul split over threads sums in another order, and over 800 steps those last-bit
    differences grow into a different model, one on which ZO may no longer learn the task. On one thread the
    embedded model is the same bit for bit on every machine with the same torch and CPU kernels.
    """
    from transformers import OPTConfig, OPTForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(TINY["seed"])
        corpus = builtin_corpus(TINY["seed"])
        tokenizer = build_tokenizer(corpus)
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
    finally:
        torch.set_num_threads(threads)
    return model, tokenizer, loss.item()


def builtin_model() -> str:
    """The embedded tiny OPT's folder, pretrained and saved (atomically) on first use."""
    folder = builtin_model_dir()
    if not (folder / "config.json").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        model, tokenizer, loss = pretrain_tiny_opt()
        write_atomically(folder, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
        print(f"embedded tiny OPT: {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"pretrained {TINY['pretrain_steps']} steps, final LM loss {loss:.3f}, saved to {folder}")
    return str(folder)


# ------------------------------------------------------------------------------------- the run's folder
#
# results.json, checkpoints and saved models, every write atomic. The folder belongs to one run at a time (a lock),
# and nothing in it that train.py did not write is ever replaced or removed: its results.json carries FORMAT, and
# OUTPUTS are the only names it writes.

def write_json(path, obj):
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2)))


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

    (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    write_atomically(out_dir / "checkpoints" / method, write)


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
        raise DataError(f"checkpoint {folder} is damaged ({first_line(e)}); start again without --resume")
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
        raise DataError(f"checkpoint {folder} does not match the model: {untied[:3]} {unexpected[:3]}")
    return state


FORMAT = "dizo-train/1"
OUTPUTS = ("results.json", "curves.png", "divergence.png", "projection.png", "checkpoints", "model")


def read_results(out_dir):
    """The run saved in out_dir, or None; DataError if its results.json is not this tool's or is damaged."""
    path = out_dir / "results.json"
    if not path.exists():
        return None
    try:
        results = json.loads(path.read_text())
        ours = isinstance(results, dict) and results.get("format") == FORMAT
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise DataError(f"{path} was not written by train.py, or is damaged; choose another --out_dir")
    return results


def check_out_dir(out_dir, settings, resume, overwrite, inputs):
    """What out_dir holds, checked against what a run with these settings would do to it (`inputs`: the paths it
    reads, which must not be inside its outputs); returns the results so far. A settings["data_hash"] of None is
    not compared (the data is not encoded yet)."""
    out_dir = Path(out_dir)
    saved = read_results(out_dir)
    data_hash = settings.get("data_hash")
    if resume:
        if saved is None:
            raise DataError(f"--resume: no results.json in {out_dir}, nothing to resume")
        changed = [k for k in settings if k != "data_hash" and saved["config"].get(k) != settings[k]]
        if changed:
            raise DataError(f"--resume: flags differ from the saved run: {', '.join(changed)}")
        if data_hash and saved["config"].get("data_hash") != data_hash:
            raise DataError("--resume: the data differ from the saved run's (were the files changed?)")
        return saved
    if saved is not None and not overwrite:
        raise DataError(f"{out_dir} already holds a run; pass --overwrite to replace it or --resume to "
                         "continue it")
    present = [out_dir / n for n in OUTPUTS if (out_dir / n).exists()]
    if saved is None and present:
        raise DataError(f"{present[0]} exists and was not written by train.py; choose another --out_dir")
    for path in present:
        for given in inputs:
            if given and Path(given).resolve().is_relative_to(path.resolve()):
                raise DataError(f"--overwrite would remove {path}, which holds {given}; choose another --out_dir")
    return {"format": FORMAT, "config": settings, "methods": {}}


def claim_out_dir(out_dir, settings, resume, overwrite, inputs):
    """Create and lock out_dir for this run (another run into it fails at once), check it again under the lock
    (see check_out_dir), and unless resuming remove the old run's outputs. Returns (results so far, lock)."""
    import fcntl

    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = open(out_dir / ".lock", "w")
    except OSError as e:
        raise DataError(f"--out_dir {out_dir}: cannot write there ({e.strerror})")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise DataError(f"another train.py is running in {out_dir}; wait for it or choose another --out_dir")
    results = check_out_dir(out_dir, settings, resume, overwrite, inputs)
    if not resume:
        for name in OUTPUTS:
            remove(out_dir / name)
        write_json(out_dir / "results.json", results)  # the folder is this run's from now on: --resume works
    return results, lock                              # even if it is killed before its first evaluation


def save_model(model, tokenizer, folder):
    """A loadable Hugging Face folder of the model and its tokenizer, written atomically."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(folder, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))


def check_disk_space(out_dir, model, copies):
    """Refuse to start without room for `copies` of the weights (+10%) where out_dir is, rather than fail at the
    first checkpoint (a checkpoint needs two while it replaces the previous one)."""
    need = sum(p.numel() * p.element_size() for p in model.parameters()) * copies * 1.1
    out_dir = Path(out_dir).absolute()
    existing = next(p for p in (out_dir, *out_dir.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < need:
        raise DataError(f"--out_dir {out_dir}: {free / 2**20:,.0f} MB free, checkpoints of this model need about "
                         f"{need / 2**20:,.0f} MB")
