"""What autograd keeps for the backward, counted: the storages of the tensors saved while ``hooks()`` is open, each
once (a saved view keeps its whole storage), those of ``exclude`` (parameters, an input) left out. Shared by the
memory-model tests (layers on a GPU, the state-passing core under Triton's interpreter)."""

from __future__ import annotations


class SavedStorages:
    def __init__(self, exclude=()) -> None:
        self.skip = {t.untyped_storage().data_ptr() for t in exclude}
        self.kept: dict[int, int] = {}
        self.first: dict[int, tuple] = {}  # storage -> (shape, dtype) of the first tensor saved on it

    def pack(self, t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.skip:
            self.kept[storage.data_ptr()] = storage.nbytes()
            self.first.setdefault(storage.data_ptr(), (tuple(t.shape), str(t.dtype).removeprefix("torch.")))
        return t

    def hooks(self):
        import torch

        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    @property
    def bytes(self) -> int:
        return sum(self.kept.values())

    def listing(self) -> list[str]:
        """One line per kept storage, largest first: its bytes and the shape and dtype first saved on it."""
        rows = sorted(((n, *self.first[p]) for p, n in self.kept.items()), key=lambda r: -r[0])
        return [f"{n:>12,} B  {list(shape)} {dtype}" for n, shape, dtype in rows]
