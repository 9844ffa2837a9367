"""Record every launch of one forward + backward through the real driver code, on the CPU.

Inputs are fake CUDA tensors (FakeTensorMode: shapes, dtypes and devices, no data, no GPU); a
dispatch mode on top records every ATen op that launches a kernel (not views or allocations),
entering the package's own custom ops (as alloc_probe.py does) so that the glue inside them is
seen too; the Triton kernels' launches and the `cuda` extension's ops are replaced by stubs that
record their name (and grid). A host sync (aten._local_scalar_dense, is_nonzero, item: .item(),
bool(tensor)) is recorded as "sync" and answered with 0 (the ordinary path: no huge rows, every
label valid). The GPU a launch would go to is an H100 as far as the driver code asks (132 SMs,
sm_90). The backward runs node by node from Python (`backward`): the autograd engine needs a
CUDA driver for CUDA tensors, fake ones included.
"""

import contextlib
import types

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import arcface_kernels as ak

H100 = types.SimpleNamespace(multi_processor_count=132, name="NVIDIA H100 80GB HBM3", major=9, minor=0,
                             total_memory=80 * 2**30, regs_per_multiprocessor=65536,
                             shared_memory_per_multiprocessor=228 * 1024, max_threads_per_multi_processor=2048)
_CUDA_KEY = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
# ATen ops that launch no kernel (views, metadata, allocations)
NO_KERNEL = {"device", "slice", "select", "view", "_unsafe_view", "unsqueeze", "squeeze", "expand", "t", "numpy_T",
             "transpose", "permute", "unbind", "split", "chunk", "as_strided", "alias", "detach", "empty",
             "empty_like", "empty_strided", "lift_fresh"}
# ... and those that launch one only when they return a new tensor (a dtype or device change)
_MAYBE_NOOP = {torch.ops.aten.to.dtype, torch.ops.aten.to.device, torch.ops.aten.to.dtype_layout,
               torch.ops.aten.contiguous.default}
# ops that read a device value on the host, and the answer of the ordinary path
_SYNCS = {torch.ops.aten._local_scalar_dense.default: 0, torch.ops.aten.is_nonzero.default: False,
          torch.ops.aten.item.default: 0}


class LaunchRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.launches = []  # ("aten", op name) | ("triton", kernel, grid) | ("cuda-op", op) | ("sync",)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "arcface_kernels":
            with self:
                return func.redispatch(_CUDA_KEY, *args, **kwargs)
        if func in _SYNCS:
            self.launches.append(("sync",))
            return _SYNCS[func]
        out = func(*args, **kwargs)
        if func.overloadpacket.__name__ not in NO_KERNEL and not (args and out is args[0] and func in _MAYBE_NOOP):
            self.launches.append(("aten", func.overloadpacket.__name__ + "." + func._overloadname))
        return out


class _KernelStub:
    def __init__(self, name, record):
        self.name, self.record = name, record

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.record.append(("triton", self.name, tuple(grid)))

    def warmup(self, *args, grid, **kwargs):
        """The compiled kernel the launch code sizes its grid from: the sm_90 compile's figures
        (bench/cost_model.SASS_FACTS, which tests/test_cost_model_sass.py checks)."""
        from bench.cost_model import SASS_FACTS

        facts = SASS_FACTS["forward" if self.name == "partial_stats_kernel" else "grad_tile"]
        return types.SimpleNamespace(n_regs=facts["registers"], metadata=types.SimpleNamespace(shared=facts["smem"]),
                                     _init_handles=lambda: None)


class _CudaOps:
    """torch.ops.arcface_kernels_cuda as the cuda backend calls it: outputs shaped, nothing computed."""

    def __init__(self, record):
        self.record = record

    def partial_stats(self, x, *args):
        self.record.append(("cuda-op", "partial_stats"))
        n = x.shape[0]
        f32 = [torch.empty(n, dtype=torch.float32, device=x.device) for _ in range(8)]
        f32[6] = torch.empty(n, dtype=torch.int64, device=x.device)
        return f32

    def grad_chunk(self, *args):
        self.record.append(("cuda-op", "grad_chunk"))

    def project_rows(self, *args):
        self.record.append(("cuda-op", "project_rows"))


@contextlib.contextmanager
def _stubs(monkeypatch, record):
    from arcface_kernels.backends import cuda as cuda_backend
    from arcface_kernels.backends import triton as triton_backend
    from arcface_kernels.backends.triton import norms

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: H100)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda.tunable, "is_enabled", lambda: False)
    for name in ("partial_stats_kernel", "grad_tile_kernel", "project_rows_kernel"):
        monkeypatch.setattr(triton_backend, name, _KernelStub(name, record))
    monkeypatch.setattr(norms, "row_norms_kernel", _KernelStub("row_norms_kernel", record))
    monkeypatch.setattr(cuda_backend, "_LOAD_ERROR", None)
    monkeypatch.setattr(cuda_backend, "BUILT_FOR", cuda_backend.GpuCode((90,), 90))
    monkeypatch.setattr(torch.ops, "arcface_kernels_cuda", _CudaOps(record))
    yield


def backward(loss):
    """loss.backward() as the autograd engine runs it (each node's backward once, in topological
    order, a node's gradients summed over its consumers), by calling the graph's nodes from Python:
    the engine itself needs a CUDA driver for CUDA tensors, fake ones included."""
    order, seen = [], set()

    def visit(node):  # depth first: a node after every node that feeds it a gradient
        if node is None or node in seen:
            return
        seen.add(node)
        for parent, _ in node.next_functions:
            visit(parent)
        order.append(node)

    visit(loss.grad_fn)
    grads = {loss.grad_fn: [torch.ones_like(loss)]}
    for node in reversed(order):
        if type(node).__name__ == "AccumulateGrad":
            continue
        outputs = (node if callable(node) else node.apply)(*grads.pop(node))
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        for (parent, slot), grad in zip(node.next_functions, outputs):
            if parent is None or grad is None or type(parent).__name__ == "AccumulateGrad":
                continue
            inputs = grads.setdefault(parent, [None] * len(parent._input_metadata))
            inputs[slot] = grad if inputs[slot] is None else inputs[slot] + grad


def record_step(backend, n, c, d, monkeypatch, dtype=torch.bfloat16, **loss_options):
    """Every launch of margin_softmax_loss(...).backward() at (N, C, D) on `backend`, in order."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(n, d, dtype=dtype, device="cuda", requires_grad=True)
        w = torch.empty(c, d, dtype=dtype, device="cuda", requires_grad=True)
        y = torch.empty(n, dtype=torch.int64, device="cuda")
        recorder = LaunchRecorder()
        with _stubs(monkeypatch, recorder.launches), recorder:
            loss = ak.margin_softmax_loss(x, w, y, backend=backend, **loss_options)
            forward = len(recorder.launches)
            backward(loss)
    return recorder.launches[:forward], recorder.launches[forward:]
