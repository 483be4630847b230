"""Named LoRA adapters on a model's per-row layers, combined by slot: what joint training and learned composition set up.

Both put several adapters' factors on the same modules (one rowlora.RowLoraLinear per module, one RowContext
for the model), define slots over them (joint training: task i → the shared adapter + task i's own; composition:
source i alone, and the weighted sum of the sources), run the model under a slot, and read a slot's factors back,
concatenated, to save that slot as one ordinary adapter. The server's bank (serving/resident.py) holds its
adapters in the same layers, but in a slot pool of its own.
"""

from __future__ import annotations

import torch

from adapterhub_lite.model.rowcontext import RowContext
from adapterhub_lite.model.rowlora import RowLoraLinear, wrap


class RowAdapters:
    """Per-row layers on some of `model`'s linear modules, sharing one slot table.

    `modules` maps each adapter module name (the name a saved adapter's factors are keyed by) to the path, in
    `model`, of the linear layer to wrap: the module itself, or the `base_layer` under a peft LoRA layer.
    """

    def __init__(self, model: torch.nn.Module, modules: dict[str, str], dropout: float = 0.0):
        self.device = next(model.parameters()).device
        self.context = RowContext()
        wrapped = wrap(model, list(modules.values()), self.context, dropout=dropout)
        self.layers: dict[str, RowLoraLinear] = {m: wrapped[path] for m, path in modules.items()}

    def put(self, name: str, factors: dict[str, tuple]) -> None:
        """Hold adapter `name`'s factors {module: (A, B, scale)} on those modules' layers (the tensors themselves)."""
        for module, (a, b, scale) in factors.items():
            self.layers[module].put(name, a, b, scale)

    def define(self, slot: int, parts: list[tuple[str, float | torch.Tensor]]) -> None:
        """Let `slot` add Σ weight·update of the named adapters (RowContext.define)."""
        self.context.define(slot, parts)

    def assign(self, slots: list[int] | int | None):
        """Context: row i through slot slots[i] (an int: every row; None: the plain base)."""
        return self.context.assign(slots, self.device)

    def factors(self, module: str, slot: int):
        """(A, B·w·scale) of a slot at `module`, its adapters concatenated along the rank; None if it has none there."""
        return self.layers[module].slot_factors(slot)

    def export_slot(self, slot: int) -> dict:
        """A slot's factors at every module it adapts, for save_lora (the slot saved as one ordinary adapter)."""
        return {m: f for m in self.layers if (f := self.factors(m, slot)) is not None}
