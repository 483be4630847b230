"""The model: the frozen backbone and what runs on it (imports only the core).

    weights.py      which folder a backbone name means (built-ins fetched or built once), its fingerprint
    backbone.py     load the backbone (8-bit / 4-bit / none) on a device, in a dtype
    adapter.py      peft configs per method (LoRA, prefix, prompt, IA3), attach / read / save
    lora_format.py  the one reader of the LoRA format: tensor names, scaling, base-rewriting inits
    rowconfig.py    what the per-row layer accepts (configs refused by field) and its tensors
    rowcontext.py   the per-row layers' slot table and each batch's slot assignment
    rowlora.py      the per-row LoRA / IA3 layer (each row of a batch through its own adapter)
    rowadapters.py  named LoRA adapters on those layers, combined by slot (joint training, composition)
    heads.py        label scoring, target-only loss, greedy decoding
    evaluate.py     predict over a split and score it (metrics from the core)
"""
