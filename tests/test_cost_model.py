"""The cost model's launch list is the driver code's: at the headline shapes, one forward +
backward through the real driver code on the CPU (tests/launch_probe.py: fake CUDA tensors,
kernels stubbed, every ATen op that launches a kernel, host sync and kernel launch recorded)
launches exactly, in order, what bench/cost_model.launches lists, with the Triton grids it
assumes."""

import pytest
from launch_probe import record_step

from bench import cost_model


def _name(record):
    kind = record[0]
    if kind == "aten":
        return record[1].split(".")[0]
    return kind if kind == "sync" else f"{kind}:{record[1]}"


@pytest.mark.parametrize("shape", [(4096, 262144, 512), (4096, 262144, 128), (512, 93431, 512)])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_launch_list_is_what_the_driver_code_launches(backend, shape, monkeypatch):
    forward, backward = record_step(backend, *shape, monkeypatch)
    plan = cost_model.launches(backend, *shape)
    for pass_, recorded in (("forward", forward), ("backward", backward)):
        modelled = [launch.op for launch in plan if launch.pass_ == pass_ and launch.op is not None]
        assert [_name(r) for r in recorded] == modelled, pass_
    # the Triton grids the model times are the ones launched
    grids = [r[2] for r in forward + backward if r[0] == "triton" and r[1] in ("partial_stats_kernel",
                                                                                "grad_tile_kernel")]
    programs = [int(launch.name.split(": ")[1].split(" programs")[0]) for launch in plan
                if launch.op in ("triton:partial_stats_kernel", "triton:grad_tile_kernel")]
    assert [g[0] * g[1] for g in grids] == programs


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_a_gpu_training_step_reads_nothing_back(backend, monkeypatch):
    """No host sync in a training step for ordinary inputs (the probe answers any read as the
    ordinary path would see it, and records it): the norm pass is one kernel per matrix, the
    label rule a device-side assert, the overflow scaling taken without a decision. The forward's
    glue around the kernels: at most 40 ATen launches (issue 22)."""
    forward, backward = record_step(backend, 4096, 262144, 512, monkeypatch)
    assert [r for r in forward + backward if r[0] == "sync"] == []
    assert len([r for r in forward if r[0] == "aten"]) <= 40
    assert [r[1] for r in forward if r[0] == "triton" and r[1] == "row_norms_kernel"] == ["row_norms_kernel"] * 2


def test_headline_counts():
    """The figures docs/backends quote: launches and host syncs of a step at the headline shape."""
    triton = cost_model.summary("triton", 4096, 262144, 512)
    cuda = cost_model.summary("cuda", 4096, 262144, 512)
    assert (triton["kernels"], triton["syncs"]) == (364, 0)
    assert (cuda["kernels"], cuda["syncs"]) == (884, 0)


def test_wave_quantization_and_occupancy():
    # three forward CTAs per SM (167 registers x 128 threads), two of the gradient tile (100 x
    # 256): a forward wave is 396 programs, and 397 run as two
    assert cost_model.ctas_per_sm("forward") == 3 and cost_model.ctas_per_sm("grad_tile") == 2
    one = cost_model.tile_kernel("forward", "forward", None, 396, 100, 512)
    two = cost_model.tile_kernel("forward", "forward", None, 397, 100, 512)
    assert "1 waves" in one.name and "2 waves" in two.name
    assert two.seconds - cost_model.LAUNCH_GAP == pytest.approx(2 * (one.seconds - cost_model.LAUNCH_GAP))
    # the launch code's grid at the headline shape: one whole wave (64 row blocks x 6 splits)
    forward = [x for x in cost_model.launches("triton", 4096, 262144, 512) if x.op == "triton:partial_stats_kernel"]
    assert [x.name for x in forward] == ["forward kernel: 384 programs, 3 CTA/SM, 1 waves"]
