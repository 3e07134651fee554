"""capture() of a model on CUDA logs what the same capture on the CPU logs (fp32 and bf16), run() and generate()."""

from __future__ import annotations

import pytest
import torch
from test_capture_api import batch, mixtral

from usmoe_lp.logs import RouterLog
from usmoe_lp.logs.capture import capture

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# fp32: no TF32 for matmuls by default; bf16: a few ulps of bf16 after two layers
TOLERANCE = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.bfloat16: {"atol": 5e-2, "rtol": 5e-2}}


def _capture(model, out, batches, generate):
    with capture(model, out, shard_tokens=16, fsync=False) as cap:
        cap.run(batches)
        gen = None
        if generate is not None:
            device = next(model.parameters()).device
            with torch.no_grad():
                gen = model.generate(**{k: v.to(device) for k, v in generate.items()}, max_new_tokens=3,
                                     min_new_tokens=3, do_sample=False, pad_token_id=0)
    return RouterLog.open(out, verify="full"), gen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_capture_equals_cpu(dtype, tmp_path):
    batches = [batch(seed=s) for s in range(3)]
    prompt = batch(seed=9)
    cpu, cpu_gen = _capture(mixtral(dtype), tmp_path / "cpu", batches, prompt if dtype == torch.float32 else None)
    gpu, gpu_gen = _capture(mixtral(dtype).cuda(), tmp_path / "gpu", batches,
                            prompt if dtype == torch.float32 else None)
    if cpu_gen is not None:
        assert torch.equal(gpu_gen.cpu(), cpu_gen)
    assert gpu.validate().ok and gpu.complete
    assert gpu.dtype == cpu.dtype == dtype
    assert gpu.num_tokens == cpu.num_tokens and len(gpu.shards) == len(cpu.shards)
    assert gpu.layers == cpu.layers
    for name in cpu.layers:
        a, b = cpu.read(name, 0, cpu.num_tokens), gpu.read(name, 0, gpu.num_tokens)
        assert b.logits.dtype == dtype
        torch.testing.assert_close(b.logits, a.logits, **TOLERANCE[dtype])
        for field in ("token_ids", "sequence_ids", "positions"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert gpu.manifest.device.startswith("cuda") and cpu.manifest.device == "cpu"
    w_cpu, w_gpu = cpu.router_weights(), gpu.router_weights()
    assert all(torch.equal(w_cpu[k], w_gpu[k]) for k in w_cpu)
