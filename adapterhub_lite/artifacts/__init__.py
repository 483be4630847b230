"""Artifacts: adapter folders and where they are kept (imports the model and the core).

    files.py       atomic writes (temp name, fsync, rename), shared file modes
    sidecar.py     the typed adapterhub.json
    folder.py      the adapter folder format: read, check (no links, no pickles, finite), model card, figures
    index.py       the registry's index format: names, versions, file records, entries
    registry.py    a local registry with integrity checks (resolve, list, verify, pull); hub.py the same on
                   the Hugging Face Hub; registries.py which one a location names
    publishing.py  a local registry's writes: publish and reindex under its lock, what a killed publisher leaves
    samples.py     routing samples kept beside an adapter
    loading.py     a folder loaded onto its backbone (fingerprint and shape checks, then peft)
"""
