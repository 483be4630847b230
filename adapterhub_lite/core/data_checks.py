"""What a run checks and says of its task data once the tokenizer is loaded: label words that tokenize alike, a
train.max_length too short for the answers (refused), and the warnings it prints before it trains or scores: prompts cut
to max_length, dev rows a train row holds, classes a split holds no row of.

Reading and rendering the rows is data.py's; this takes its Splits.
"""

from __future__ import annotations

from adapterhub_lite.core.data import Split, label_words
from adapterhub_lite.core.datafiles import where
from adapterhub_lite.core.errors import DataError
from adapterhub_lite.core.spec import TaskSpec


def _label_ids(spec: TaskSpec, tokenizer) -> list[tuple[str, tuple[int, ...]]]:
    """Each label word with its token ids as it follows the prompt (as heads.answer_ids tokenizes it)."""
    return [(word, tuple(tokenizer(" " + word, add_special_tokens=False).input_ids)) for word in map(str, label_words(spec))]


def check_label_tokens(spec: TaskSpec, tokenizer) -> None:
    """Refuse label words that tokenize alike after the prompt (a tokenizer that normalizes or maps both to one unknown
    token): their scores are one, so the first always wins and the other class is never predicted. The spec refuses one
    word given twice; this needs the tokenizer, so check_lengths calls it and every command that loads one checks it
    (train, train-multi, compose-fit, eval, predict). Words that only begin alike are told apart: every label is scored
    on all its tokens."""
    seen: dict[tuple, str] = {}
    for word, ids in _label_ids(spec, tokenizer):
        if ids in seen:
            raise DataError(f"labels {seen[ids]!r} and {word!r} of {spec.name!r} tokenize to identical sequences {list(ids)}, so no prediction "
                            "can tell them apart; choose distinct verbalizer words")
        seen[ids] = word


def check_lengths(spec: TaskSpec, tokenizer, data: dict[str, Split] | None = None) -> None:
    """Refuse a train.max_length that cannot hold one prompt token plus the longest answer, naming the minimum (and, for
    classification, labels that tokenize alike: check_label_tokens).

    Classification: the longest label word (as it follows the prompt). Generation: the longest target of
    the training split plus EOS (`data`'s train split, when given). A smaller budget would otherwise leave
    the prompt no tokens (or keep all of it: ids[-0:]) or cut the answer.
    """
    max_length = spec.train.max_length
    if spec.type == "classification":
        check_label_tokens(spec, tokenizer)
        sizes = {word: len(ids) for word, ids in _label_ids(spec, tokenizer)}
        word = max(sizes, key=sizes.get)
        need, what = sizes[word] + 1, f"the longest label {word!r} ({sizes[word]} tokens)"
    elif data and "train" in data and len(data["train"]):
        ids = data["train"].answer_ids(tokenizer)
        row = max(range(len(ids)), key=lambda i: len(ids[i]))
        need, what = len(ids[row]) + 2, f"the longest target (row {row + 1} of {data['train'].source!r}: {len(ids[row])} tokens + EOS)"
    else:
        return
    if max_length < need:
        raise DataError(f"train.max_length={max_length} cannot hold one prompt token and {what}; use train.max_length ≥ {need}")


def cut_rows(spec: TaskSpec, tokenizer, split: Split, training: bool, limit: int | None = None) -> str | None:
    """A warning when some of (the first `limit` of) `split`'s prompts do not fit train.max_length and lose their start, else None.

    Prompts keep their end within max_length (heads.keep_end): after the longest label (classification), after the
    row's target + EOS when training a generation, after max_new_tokens when decoding one. That changes what the model
    reads of a row, so it is said, with the count and the length that keeps every prompt whole.
    """
    max_length = spec.train.max_length
    prompts = split.prompt_ids(tokenizer)[:limit]
    if spec.type == "classification":
        label = max(len(ids) for _, ids in _label_ids(spec, tokenizer))
        room = [label] * len(prompts)
    elif training:  # heads._target: the answer + EOS, itself cut to leave one prompt token
        room = [min(len(a) + 1, max_length - 1) for a in split.answer_ids(tokenizer)]
    else:
        room = [spec.train.max_new_tokens] * len(prompts)
    cut = [i for i, (p, r) in enumerate(zip(prompts, room)) if len(p) > max_length - r]
    if not cut:
        return None
    need = max(len(prompts[i]) + room[i] for i in cut)
    return (f"warning: {len(cut)} of {len(prompts)} rows of {split.source!r} ({where(None, [i + 1 for i in cut])}) do not fit train.max_length={max_length} "
            f"and are read without the start of their prompt; train.max_length={need} keeps every one whole")


def dev_overlap(data: dict[str, Split]) -> str | None:
    """A warning when dev rows have the prompt of a train row (leakage: their dev score is a score on seen inputs), else None."""
    seen = set(data["train"].prompts)
    dev = data["dev"]
    same = [i for i, p in enumerate(dev.prompts) if p in seen]
    if not same:
        return None
    return (f"warning: {len(same)} of {len(dev)} rows of {dev.source!r} ({where(None, [i + 1 for i in same])}) have the same prompt as a row of "
            f"{data['train'].source!r}, so the dev metrics score inputs the adapter trained on; drop those rows from one split")


def absent_classes(spec: TaskSpec, split: Split, limit: int | None = None) -> str | None:
    """A warning when (the first `limit` of) a classification split's rows hold no row of some class of 'labels', else None:
    such a class is scored on nothing (no recall to measure, no F1 unless it is predicted), so macro_f1 averages the
    classes present, as scikit-learn's f1_score does, and per_class shows it with null figures."""
    if spec.type != "classification":
        return None
    held = set(split.answers[:limit])
    keys = list(spec.labels) if isinstance(spec.labels, dict) else label_words(spec)
    words = label_words(spec)
    missing = [repr(str(words[i])) + (f" (column value {str(k)!r})" if str(k) != str(words[i]) else "") for i, k in enumerate(keys) if i not in held]
    if not missing:
        return None
    rows = f"the first {min(limit, len(split))} rows" if limit and limit < len(split) else f"the {len(split)} rows"
    return (f"warning: {rows} of {split.source!r} hold no row of class(es) {', '.join(missing)} ({len(missing)} of {len(keys)}): macro_f1 "
            "averages the classes scored or predicted (as sklearn's f1_score), per_class gives an absent class null figures "
            "unless it is predicted; add rows of every class to score each")


def data_warnings(spec: TaskSpec, tokenizer, data: dict[str, Split]) -> list[str]:
    """What a training run says of its data before it starts (train and train-multi alike): prompts that lose their
    start to train.max_length, in either split, dev rows a train row holds, and classes the dev split has no row of."""
    found = (cut_rows(spec, tokenizer, data["train"], True), cut_rows(spec, tokenizer, data["dev"], False), dev_overlap(data),
             absent_classes(spec, data["dev"]))
    return [w for w in found if w]

