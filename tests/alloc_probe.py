"""A dispatch mode that records the size of every tensor any ATen op creates."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bench.live_bytes import OWN_NAMESPACES


def _device_key(args, kwargs):
    cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in tree_leaves((args, kwargs)))
    return torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA if cuda else torch._C.DispatchKey.CPU)


class LargestAllocation(TorchDispatchMode):
    """Tracks the largest tensor (in elements) produced by any op while active. The package's own
    ops are entered (redispatched below the mode, with the mode active again; OWN_NAMESPACES) so
    that what their implementations and the backends allocate is seen too (in a C++ op: what it
    allocates through the dispatcher), not only their outputs."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.largest_op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in OWN_NAMESPACES:
            with self:
                out = func.redispatch(_device_key(args, kwargs), *args, **kwargs)
        else:
            out = func(*args, **kwargs)
        # outputs that alias an input's storage (views, in-place ops, set_) allocate nothing
        leaves = tree_leaves((args, kwargs))
        inputs = {_storage(t) for t in leaves if isinstance(t, (torch.Tensor, torch.UntypedStorage))}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest and _storage(t) not in inputs:
                self.largest, self.largest_op = t.numel(), str(func)
        return out


def _storage(t):
    return (t if isinstance(t, torch.UntypedStorage) else t.untyped_storage()).data_ptr()
