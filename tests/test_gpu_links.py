"""GPU links on a real local Ray (cuda_ipc between two actors sharing one GPU, the NCCL refusal).

Skipped unless cupy imports and sees a CUDA device; bench/gpu_check.sh runs these too.
"""
from __future__ import annotations

import pytest

import oobspec
from conftest import ROOT


def _gpus() -> int:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return 0


pytestmark = [pytest.mark.gpu, pytest.mark.ray, pytest.mark.timeout(150),
              pytest.mark.skipif(_gpus() == 0, reason="needs cupy and a CUDA GPU")]


def test_cuda_ipc_link_on_one_gpu(local_ray):
    import ray
    spec = oobspec.load(ROOT / "specs" / "gpu-link.yaml")
    with oobspec.deploy(spec) as d:
        for version, value in enumerate([1.0, 2.5], start=1):
            pushed = ray.get(d.handle("trainer").step.remote(value))
            assert pushed["transport"] == "cuda_ipc" and pushed["version"] == version
            assert pushed["direct"] == 1  # one GPU: the source writes the target itself, no Ray call
            got = ray.get(d.handle("server").checksum.remote())
            assert got == {"version": version, "sum": value * 4096 * 4096}
            print(f"cuda_ipc push of 64 MiB: {pushed['gbps']:.1f} GB/s")


def test_nccl_on_one_gpu_is_refused_clearly(local_ray, write_spec):
    from oobspec.errors import OobError
    path = write_spec((ROOT / "specs" / "gpu-link.yaml").read_text().replace("transport: cuda_ipc", "transport: nccl"))
    with pytest.raises(OobError) as err:
        with oobspec.deploy(oobspec.load(path)):
            pass
    assert "cuda_ipc" in str(err.value) and "share" in str(err.value)


def test_gpu_layout_double_buffered_with_torch_tensors(local_ray, write_spec):
    """The weight-sync pattern on a GPU: one bucket of named parts, bfloat16 included, reached as
    torch cuda tensors on both ends; targets always see a complete version."""
    import ray
    pytest.importorskip("torch")
    path = write_spec("""
        version: 1
        name: gpu-bucket
        actors:
          trainer:
            class: apps:TorchTrainer
            resources: {gpus: 0.25}
            buffers: {params: {device: gpu, layout: {w: {shape: [1024, 1024], dtype: bfloat16}, b: {shape: [1024]}}}}
          server:
            class: apps:TorchServer
            replicas: 2
            resources: {gpus: 0.25}
            buffers: {params: {device: gpu, layout: {w: {shape: [1024, 1024], dtype: bfloat16}, b: {shape: [1024]}}}}
        links:
          - {name: weights, from: trainer.params, to: server.params, buffering: double}
    """)
    with oobspec.deploy(oobspec.load(path)) as d:
        servers = [d.handle("server", i) for i in range(2)]
        for version, value in enumerate([1.5, -2.0, 3.25], start=1):
            waiting = [s.next.remote(version - 1) for s in servers]
            pushed = ray.get(d.handle("trainer").step.remote(value))
            assert (pushed["version"], pushed["direct"], pushed["transport"]) == (version, 2, "cuda_ipc")
            assert ray.get(waiting, timeout=60) == [(version, value * 1024 * 1024, value * 1024)] * 2
