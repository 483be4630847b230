"""The training library: what every training recipe shares (torchtune's split: thin recipes over a
small library).

    progress.py      run state, data order (sharded by rank), seeding, run identity for resume
    parallel.py      one process or many (accelerate: torchrun / accelerate launch), rank 0 writes
    checkpoint.py    checkpoints through accelerate's save_state / load_state, swapped in atomically
    loop.py          the one loop: accumulate, clip, step, schedule, log, eval, keep best, stop, checkpoint
    output.py        the hidden work folder, the sidecar, the finished folder moved into place

Recipes (train.py: one task adapter; multitask/joint.py: several adapters in one pass) say only
what differs: how a batch becomes a loss, how the run is evaluated, what the folder holds.
"""
