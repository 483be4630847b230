"""Training recipes over the library (training/): each says only how a batch becomes a loss, how the run is
evaluated and what its folder holds.

    train.py     one task adapter (`adapterhub-lite train`)
    joint.py     several task adapters in one pass (`train-multi`), with weighting.py and mixing.py
    compose.py   a new task's adapter as learned weights over existing LoRA adapters (`compose-fit`)
"""
