"""The core: what every layer may use and that imports nothing of the package above it.

    errors.py    typed errors (subclasses of ValueError, as peft's are)
    names.py     the served names that are not adapters (base, auto, merged-…) and the backbone's choices
    spec.py      the task spec (YAML), built and checked in one pass; spec_checks.py its prompt, labels and
                 method_args, each checked alone; spec_yaml.py its file, read strictly
    data.py      task data: files and datasets → rows, prompts and answers
    data_checks.py  what a run checks and warns of its data once the tokenizer is loaded
    text.py      what users type: UTF-8 text files, JSON Lines, a generation's answer
    metrics.py   classification and generation metrics (scikit-learn)
"""

__version__ = "0.1.0"
