"""The training library: what every training recipe shares (torchtune's split: thin recipes over a
small library).

    progress.py      run state, data order (sharded by rank), seeding, run identity for resume
    parallel.py      one process or many (accelerate: torchrun / accelerate launch), rank 0 writes
    checkpoint.py    checkpoints through accelerate's save_state / load_state, swapped in atomically
    loop.py          the one loop: accumulate, clip, step, schedule, log, eval, keep best, stop, checkpoint
    output.py        the hidden work folder, the sidecar, the finished folder moved into place

    defaults.py      what a spec leaves out, resolved from the data and the model
    joint_config.py  a joint run's settings (JointConfig, SHARED_TRAIN_KEYS) and which sets of tasks it accepts
    weighting.py     loss weighting across tasks; mixing.py which task each batch draws from

Recipes (recipes/: train.py one task adapter, joint.py several in one pass, compose.py learned composition)
say only what differs: how a batch becomes a loss, how the run is evaluated, what the folder holds.
Training may import ops, artifacts, model and core (it uses all but ops); never serving.
"""
