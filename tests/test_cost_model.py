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
    grids = [r[2] for r in forward + backward if r[0] == "triton" and r[1] != "project_rows_kernel"]
    programs = [int(launch.name.split(": ")[1].split(" programs")[0]) for launch in plan
                if launch.op in ("triton:partial_stats_kernel", "triton:grad_tile_kernel")]
    assert [g[0] * g[1] for g in grids] == programs


def test_headline_counts():
    """The figures docs/backends quote: launches and host syncs of a step at the headline shape."""
    triton = cost_model.summary("triton", 4096, 262144, 512)
    cuda = cost_model.summary("cuda", 4096, 262144, 512)
    assert (triton["kernels"], triton["syncs"]) == (1101, 5)
    assert (cuda["kernels"], cuda["syncs"]) == (1621, 5)


def test_wave_quantization_and_occupancy():
    # the forward kernel holds one CTA per SM (221 registers x 256 threads); 544 programs are 5 waves
    assert cost_model.ctas_per_sm("forward") == 1 and cost_model.ctas_per_sm("grad_tile") == 2
    kernel = cost_model.tile_kernel("forward", "forward", None, 544, 241, 512)
    assert "5 waves" in kernel.name
    one_wave = cost_model.tile_kernel("forward", "forward", None, 132, 241, 512)
    assert kernel.seconds - cost_model.LAUNCH_GAP == pytest.approx(5 * (one_wave.seconds - cost_model.LAUNCH_GAP))
