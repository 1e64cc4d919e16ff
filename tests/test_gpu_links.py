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
