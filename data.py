"""Tasks, prompts and data for DiZO / MeZO / FO fine-tuning.

Two kinds of data:

* Real tasks (PAPER.md §6): GLUE-style TSV files `train.tsv`, `dev.tsv`, `test.tsv` in one folder. The first
  line is a header; columns are found by name ("sentence", or "premise"/"hypothesis" -- GLUE RTE's
  "sentence1"/"sentence2" are accepted as aliases -- and "label"). A header without these names falls back
  to positions: the text column(s) first, the label last. Fields are split on tabs, with no quoting (as
  GLUE writes them). LM-BFF ships MR, CR, MPQA, Subj, SST-5 and TREC as headerless CSV; convert them to
  this format first.
* The built-in task "toy": a small sentiment task with a matching pretraining corpus, generated from a
  seeded `random.Random`, so that the whole pipeline runs offline on a tiny model (see `builtin_corpus`).

Prompts: a causal LM scores each candidate label word appended to `causal_prompt(task, ex)` (the mean
log-probability of its tokens); a masked LM reads the logits of the label words at the mask of
`masked_prompt(task, ex, mask_token)`. Templates are `str.format` strings with one placeholder per text
column and `{mask}`.
"""
import os
import random
import string
from collections import Counter
from dataclasses import dataclass

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast


class DataError(ValueError):
    """A problem with the user's data or task options; the message is one line, with path:line if any."""


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
    """The `{name}` fields of a format string, in order of appearance."""
    try:
        return [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as err:
        raise DataError(f"template {template!r}: {err}") from None


def _check_template(template: str, text_columns: tuple[str, ...]) -> None:
    """A template must use {mask} once and each text column, and nothing else."""
    fields = _placeholders(template)
    if fields.count("mask") != 1:
        raise DataError(f"template {template!r} must contain {{mask}} exactly once")
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


def _column_positions(header: list[str], task: Task) -> tuple[list[int], int]:
    """Positions of the text columns and of the label: by header name, else text first and label last."""
    names = [h.strip().lower() for h in header]

    def find(column: str) -> int | None:
        return next((names.index(a) for a in _ALIASES.get(column, (column,)) if a in names), None)

    texts, label = [find(c) for c in task.text_columns], find("label")
    if None not in texts and label is not None:
        return texts, label
    if len(header) < len(task.text_columns) + 1:
        raise DataError(f"expected columns {', '.join(task.text_columns)} and label, header has {len(header)}")
    return list(range(len(task.text_columns))), len(header) - 1


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not lines:
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
    """Read a GLUE-style TSV (header line, then one example per line) into Examples of `task`."""
    lines = _read_lines(path)
    header = lines[0].split("\t")
    examples = []
    for number, line in enumerate(lines, start=1):
        try:
            if number == 1:
                text_at, label_at = _column_positions(header, task)
            elif line:  # a blank line (e.g. at the end) is not an example
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


# ------------------------------------------------------------------------------------- built-in task
#
# Task "toy" is binary sentiment on short film reviews, read through SST-2's prompt ("<review> it was" ->
# " terrible" / " great"). The corpus that pretrains the tiny model is built so that the model knows each
# review's polarity but not, yet, which label word goes with it -- the situation in which zeroth-order
# fine-tuning works: the knowledge is in the model and only the label words need aligning.
#  * Reviews are followed by reactions ("i loved it", "what a waste of time") and by polar verdicts after
#    "it was" ("it was a joy", "it was awful"): the model's state at the prompt's end carries the polarity.
#  * After "it was", " great" is three times as frequent as " terrible" (everyday events, reviews): the
#    prior that makes the untuned model answer " great" to almost everything, as large LMs lean to one
#    label word (Zhao et al. 2021, "Calibrate before use").
#  * The label words follow a review's polarity only after reviews made of "familiar" words (even positions
#    in the lists below): a weak, partial link that gives the model's slight preference its right sign.
# Without the prior, the untuned model's choice between the two words follows its polarity feature with a
# sign set by chance, so zero-shot accuracy lands near 0 or near 1 and would not show what fine-tuning did.

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
_CONNECTIVES = (" and", " ,", " but")
_REACTIONS = (("i hated it", "what a waste of time", "i want my money back", "avoid it", "i walked out early",
               "never again", "two thumbs down"),
              ("i loved it", "i enjoyed every minute", "i would watch it again", "highly recommended",
               "a must see", "i was smiling all the way home", "two thumbs up"))
_VERDICTS = (("awful", "horrible", "a mess", "a chore", "dreadful", "a disaster"),
             ("wonderful", "amazing", "a joy", "a delight", "fantastic", "a treat"))
_EVENTS = ("we went to the beach", "i visited my aunt", "we had dinner at the new place", "the trip to the city",
           "my first day at work", "the party last night", "the drive home", "the weather on sunday",
           "the concert in the park", "our holiday by the lake", "the match on saturday", "the wedding",
           "the flight back", "the hotel", "the new job", "the meeting this morning")
_LABEL_WORDS = ("terrible", "great")

CLAUSE_COUNTS = (1, 2, 3, 3)  # drawn uniformly: half the reviews have 3 clauses, room for a mixed one
ADJECTIVE_SHARE = 0.7    # clauses "<aspect> was <adjective>"; the rest "<aspect> <verb phrase>"
TOY_SIZES = {"train": 512, "dev": 200, "test": 500}  # test: 500 examples resolve accuracy to about ±2%
MIXED_SHARE = 0.5        # of 3-clause reviews, those with one clause of the other polarity (label: the majority)
EVENT_SHARE = 0.25       # corpus lines "<event> , it was great|terrible"
REACTION_SHARE = 0.35    # "<review> . <reaction>"
LEADING_REACTION_SHARE = 0.10  # "<reaction> . <review>"; the rest: "<review> it was <verdict or label word>"
LABEL_WORD_SHARE = 0.4   # of "<review> it was ..." lines, those ending in a label word rather than a verdict
GREAT_PRIOR = 0.75       # P(great) wherever a label word does not follow the polarity
AGREEMENT = 0.9          # P(the label word follows the polarity) after a review of familiar words


def _clause(rng: random.Random, aspect: str, polarity: int) -> tuple[str, bool]:
    """One clause of the given polarity, and whether its sentiment word is familiar."""
    if rng.random() < ADJECTIVE_SHARE:
        i = rng.randrange(len(_ADJECTIVES[polarity]))
        return f"{aspect} was {rng.choice(_ADVERBS)}{_ADJECTIVES[polarity][i]}", i % 2 == 0
    i = rng.randrange(len(_VERB_PHRASES[polarity]))
    return f"{aspect} {_VERB_PHRASES[polarity][i]}", i % 2 == 0


def _review(rng: random.Random, polarity: int) -> tuple[str, bool]:
    """A review of 1 to 3 clauses whose majority has the given polarity, and whether all its words are familiar."""
    n = rng.choice(CLAUSE_COUNTS)
    polarities = [polarity] * n
    if n == 3 and rng.random() < MIXED_SHARE:
        polarities[rng.randrange(3)] = 1 - polarity
    clauses = [_clause(rng, aspect, pol) for aspect, pol in zip(rng.sample(_ASPECTS, n), polarities)]
    text = clauses[0][0]
    for clause, _ in clauses[1:]:
        text += f"{rng.choice(_CONNECTIVES)} {clause}"
    return text, all(familiar for _, familiar in clauses)


def builtin_splits(seed: int = 0) -> dict[str, list[Example]]:
    """train/dev/test of task "toy": distinct reviews, no sentence in two splits, classes balanced."""
    rng = random.Random(f"toy:{seed}")
    seen, splits = set(), {}
    for split, size in TOY_SIZES.items():
        examples = []
        while len(examples) < size:
            label = len(examples) % 2
            text, _ = _review(rng, label)
            if text not in seen:
                seen.add(text)
                examples.append(Example((text,), label))
        rng.shuffle(examples)
        splits[split] = examples
    return splits


def _label_word(rng: random.Random, polarity: int, familiar: bool) -> str:
    if familiar and rng.random() < AGREEMENT:
        return _LABEL_WORDS[polarity]
    return _LABEL_WORDS[rng.random() < GREAT_PRIOR]


def _corpus_line(rng: random.Random, avoid: set[str]) -> str:
    """One pretraining sentence; its review, if any, is not in `avoid`."""
    kind = rng.random()
    if kind < EVENT_SHARE:
        return f"{rng.choice(_EVENTS)} , it was {_label_word(rng, 0, familiar=False)}"
    polarity = rng.randrange(2)
    review, familiar = _review(rng, polarity)
    while review in avoid:
        review, familiar = _review(rng, polarity)
    kind -= EVENT_SHARE
    if kind < REACTION_SHARE:
        return f"{review} . {rng.choice(_REACTIONS[polarity])}"
    if kind < REACTION_SHARE + LEADING_REACTION_SHARE:
        return f"{rng.choice(_REACTIONS[polarity])} . {review}"
    if rng.random() < LABEL_WORD_SHARE:
        return f"{review} it was {_label_word(rng, polarity, familiar)}"
    return f"{review} it was {rng.choice(_VERDICTS[polarity])}"


def builtin_corpus(seed: int = 0, n: int = 20000) -> list[str]:
    """Pretraining text for the built-in tiny LM (about 180 words); it holds no review of task "toy"."""
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
