"""Which registry a location names, and adapters named by folder or by reference.

    open_registry("adapters")          a local folder (registry.LocalRegistry)
    open_registry("hf://org/repo")     a Hugging Face Hub repository (hub.HubRegistry)

Kept apart from registry.py so that the dependencies point one way: hub.py builds on registry.py,
and this module on both.
"""

from __future__ import annotations

from pathlib import Path

from adapterhub_lite.artifacts.hub import HubRegistry
from adapterhub_lite.artifacts.index import RegistryError, parse_ref
from adapterhub_lite.artifacts.registry import LocalRegistry, check_if_registered


def open_registry(location: str | Path):
    """A registry object for a local folder or an `hf://org/repo` address."""
    if str(location).startswith("hf://"):
        return HubRegistry(str(location)[5:])
    return LocalRegistry(location)


def adapter_ref(ref: str | Path, registry: str | Path = "adapters") -> tuple[str, Path]:
    """An adapter given as a folder or as name[@version] in a registry: its name and (verified) folder."""
    if Path(ref).is_dir():
        checked = check_if_registered(ref)  # a registry version reached by its path is re-hashed like one reached by name
        return (checked.split("@")[0] if checked else Path(ref).name), Path(ref)  # a version folder is named by its adapter, not "1.0.0"
    if "/" in str(ref) or Path(ref).exists():
        raise RegistryError(f"adapter folder {str(ref)!r} does not exist; pass an adapter folder or name[@version] in the {str(registry)!r} registry")
    return parse_ref(str(ref))[0], open_registry(registry).path(str(ref))
