"""LiveBytes: the live and peak bytes of what ATen allocates inside a block, on any device, the
package's custom ops entered (tests/test_workspace.py checks the workspace budget with it,
bench/cpu_table.py reports peak extra memory with it)."""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# The package's op namespaces: the custom ops (Python implementations) and the CPU extension's
# C++ ops, entered so that what they allocate inside is seen, not only what they return.
OWN_NAMESPACES = ("arcface_kernels", "arcface_kernels_cpu")


class LiveBytes(TorchDispatchMode):
    """Live bytes of the storages any ATen op allocates while active, and their peak. A storage
    counts until it is freed (its Python object is preserved by torch, so a weakref finalizer
    fires when the memory goes); outputs that alias an input (views, in-place ops) are not new.
    The package's own ops are entered (redispatched below the mode, OWN_NAMESPACES) so that what
    their implementations allocate is seen too (in a C++ op: what it allocates through the
    dispatcher, at::empty)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = set()

    def _release(self, key, nbytes):
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in OWN_NAMESPACES:  # outputs made inside are counted there (the _seen check)
            with self:
                out = func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        else:
            out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.untyped_storage().nbytes() == 0:
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in inputs or key in self._seen:
                continue
            self._seen.add(key)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key, storage.nbytes())
        return out
