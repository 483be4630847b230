"""The checks of a spec's three free-form values: the prompt template, the label words and the method_args peft reads.

Each takes the value alone and returns one message per problem (empty: none), so that spec.py's one validating pass
can show every problem at once; model/adapter.py checks an adapter's method_args with the same function, without a spec.
Kept apart from spec.py, which says what a spec holds and builds it; this module only says what these values may be.
"""

from __future__ import annotations

import math
import string
import unicodedata
from typing import Any


def _plain_column(name: str) -> bool:
    """Whether str.format reads `{name}` as the keyword `name`: any column name (a header such as "review text" or
    "sentence-1" too), but not a positional index (`{0}`) or an attribute or item (`{a.b}`, `{a[0]}`)."""
    try:
        return ("{" + name + "}").format(**{name: "x"}) == "x"
    except (IndexError, KeyError, ValueError, AttributeError, TypeError):
        return False


def prompt_problems(prompt: str) -> list[str]:
    """What is wrong with a prompt template: it must name columns as plain `{column}` placeholders.

    Rows are rendered with str.format, so a conversion (`!r`), a format spec (`:>10`, `:{width}`), an
    attribute or index (`{a.b}`, `{a[0]}`) or a positional `{}` would fail (or change the text) only at
    render time; they are refused here, naming the field.
    """
    try:
        parsed = list(string.Formatter().parse(prompt))
    except ValueError as exc:
        return [f"prompt {prompt!r} is not a valid template ({exc}); write literal braces as {{{{ and }}}}"]
    problems = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        if not _plain_column(name):
            problems.append(f"prompt field {shown} is not a column name; use {{column}} placeholders (literal braces: {{{{ and }}}})")
        elif conversion or spec:
            problems.append(f"prompt field {shown} has a conversion or format spec, which prompts do not support; write {{{name}}}")
    if not problems and not any(name for _, name, _, _ in parsed):
        problems.append(f"prompt {prompt!r} names no column; use {{column}} placeholders")
    return problems


def _not_text(value: Any) -> str | None:
    """Why a label word or key is not what the user typed, or None: YAML reads an unquoted yes / no / on / off / true /
    false as a boolean and null / ~ as None, so `labels: [no, yes]` made the words False and True."""
    if isinstance(value, bool):
        return f"is the boolean {value} (YAML reads an unquoted yes, no, on, off, true or false so); quote it as written ('{'yes' if value else 'no'}')"
    if value is None:
        return "is null (YAML reads an unquoted null or ~, or nothing, so); quote the word"
    return None


def label_problems(labels: list | dict) -> list[str]:
    """Label words must be text (they are tokenized after the prompt: a number or boolean is not a word), and a
    mapping's keys the column values as the user typed them (text or whole numbers, never a YAML boolean or null)."""
    problems = []
    items = labels.items() if isinstance(labels, dict) else enumerate(labels)
    for key, word in items:
        where = f"labels[{key!r}]" if isinstance(labels, dict) else f"labels[{key}]"
        why = _not_text(word)
        if why is None and isinstance(word, (int, float)):
            why = f"is the number {word}, not a word; quote it ('{word}')"
        elif why is None and not isinstance(word, str):
            why = f"is a {type(word).__name__}, not a word; give each class one word"
        elif why is None and not word.strip():  # scored as the bare space after the prompt: a class no answer names
            why = "is empty; give each class a word"
        elif why is None and word != word.strip():  # heads.answer_ids puts one space before the word already
            why = f"has spaces around it (the word follows the prompt after one space); write {word.strip()!r}"
        if why:
            problems.append(f"{where}={word!r} {why}")
        if isinstance(labels, dict):
            why = _not_text(key)
            if why is None and not isinstance(key, (str, int)):
                why = f"is the number {key}; write the column's value as text ('{key}')"
            if isinstance(key, bool):  # a JSON true in the column is read as written (core.text.as_text), 'true'
                why += f" or '{str(key).lower()}' for a JSON {str(key).lower()} in the column"
            if why:
                problems.append(f"the key {key!r} of 'labels' {why}")
    if isinstance(labels, dict):  # the column is read as text: 1 and '1' name the same value, so one class could never be
        same = [k for k in labels if not isinstance(k, bool) and sum(str(j) == str(k) for j in labels if not isinstance(j, bool)) > 1]
        if same:
            problems.append(f"the keys {' and '.join(map(repr, same))} of 'labels' both mean the column value {str(same[0])!r}; keep one")
    # Two classes of one word (or one word in two Unicode forms, printed alike): scored alike, the first always wins, so the
    # other is never predicted, and per_class, keyed by word, would keep one of them. Refused here, from the spec alone,
    # before any command loads a tokenizer (data_checks.check_label_tokens catches the words a tokenizer maps alike).
    pairs = list(labels.items() if isinstance(labels, dict) else enumerate(labels))
    words = [(key, word, unicodedata.normalize("NFC", word)) for key, word in pairs if isinstance(word, str) and word.strip()]
    for form in dict.fromkeys(f for _, _, f in words):
        classes = [(key, word) for key, word, f in words if f == form]
        if len(classes) > 1:
            named = " and ".join(f"labels[{k!r}]" if isinstance(labels, dict) else f"labels[{k}]" for k, _ in classes)
            if len({w for _, w in classes}) > 1:  # other bytes, other tokens: told apart by the model, not by a reader
                shown = ", ".join(ascii(w) for w in dict.fromkeys(w for _, w in classes))
                problems.append(f"{named} are one word {form!r} in two Unicode forms ({shown}), so a prediction of either prints alike; "
                                "give each class its own word")
            else:
                problems.append(f"{named} are one word {form!r}, so no prediction can tell those classes apart; give each class its own word")
    return problems


# method_args that peft would otherwise take unchecked (a str rank fails deep inside peft with a TypeError).
_POSITIVE_INTS = {"lora": ("r",), "prefix": ("num_virtual_tokens",), "prompt": ("num_virtual_tokens",), "ia3": ()}


def method_args_problems(method: str, args: dict) -> list[str]:
    """Type and range problems of the method_args peft reads for `method`, one message each."""
    problems = []
    for key in _POSITIVE_INTS.get(method, ()):
        value = args.get(key)
        if key in args and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            fix = "an adapter needs at least one rank" if key == "r" else "at least one virtual token"
            problems.append(f"method_args.{key}={value!r} must be a whole number ≥ 1 ({fix}), e.g. {key}: 8")
    if method == "lora":
        for key, low, high in (("lora_alpha", 0.0, math.inf), ("lora_dropout", 0.0, 1.0)):
            value = args.get(key)
            if key in args and (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
                                or not low <= value < high or (key == "lora_alpha" and value == 0)):
                rule = "a number > 0" if key == "lora_alpha" else "a number in [0, 1)"
                problems.append(f"method_args.{key}={value!r} must be {rule}")
        targets = args.get("target_modules")
        if "target_modules" in args and not (isinstance(targets, str) or (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))):
            problems.append(f"method_args.target_modules={targets!r} must be a module name or a list of names, e.g. [q_proj, v_proj]")
    checked = {*_POSITIVE_INTS.get(method, ()), "lora_alpha", "lora_dropout"}
    for key, value in args.items():  # any other number peft takes must be finite too
        if key not in checked and isinstance(value, float) and not math.isfinite(value):
            problems.append(f"method_args.{key}={value!r} is not a finite number; give a finite value")
    return problems
