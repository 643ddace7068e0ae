"""The GPU path on a real GPU: every test here is marked `cuda` and skips where none is visible
(tests/conftest.py). `bash scripts/gpu_check.sh` runs them, then trains and benchmarks.

- each kernel backend that runs on CUDA, in bf16, against the fp32 CPU reference (forward, loss,
  gradients);
- an MoE layer's forward and backward never read a device value on the host (sync debug mode);
- the trainer's steps between logging intervals never wait for the GPU;
- fp16 with the gradient scaler trains and resumes; compile=true trains like eager.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from nanomoe import kernels
from nanomoe.errors import ConfigError
from nanomoe.model import GPT
from nanomoe.moe import MoEFeedForward
from nanomoe.presets import get_preset
from nanomoe.training.config import TrainConfig
from nanomoe.training.trainer import Trainer

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from nanomoe.data import prepare_data

    return prepare_data("builtin:0.4", tmp_path_factory.mktemp("data") / "stories", vocab_size=512, progress=False)


def cuda_backends() -> list[str]:
    """The kernel backends that accept CUDA (torch today; a grouped-GEMM one where it exists)."""
    names = []
    for choice in kernels.CHOICES:
        try:
            names.append(kernels.resolve(choice, CUDA))
        except ConfigError:  # native: CPU only
            pass
    return sorted(set(names))


def quiet(**changes) -> TrainConfig:
    base = dict(batch_size=8, max_steps=20, eval_every=1000, eval_batches=2, save_every=0, log_every=1000,
                samples=0, tensorboard=False, plots=False, progress=False, precision="bf16", lr=1e-3, seed=3,
                device="cuda")
    return TrainConfig(**{**base, **changes})


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float().cpu() - want.float()).norm() / want.float().norm().clamp(min=1e-12)).item()


@pytest.mark.parametrize("preset", ["debug", "tiny-moe"])
def test_every_cuda_backend_in_bf16_matches_the_fp32_cpu_reference(preset):
    cfg = get_preset(preset, vocab_size=512, block_size=64, dropout=0.0, kernels="torch")
    torch.manual_seed(0)
    reference = GPT(cfg).train()
    reference.init_weights()
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (4, 64), generator=gen)
    y = torch.randint(0, cfg.vocab_size, (4, 64), generator=gen)
    out = reference(x, y)
    (out.loss + out.aux_loss).backward()
    want = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}

    for backend in cuda_backends():
        model = GPT(cfg.replace(kernels=backend)).train()
        model.load_state_dict(reference.state_dict())
        model.to(CUDA)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = model(x.to(CUDA), y.to(CUDA))
        (got.loss + got.aux_loss).backward()
        assert got.loss.item() == pytest.approx(out.loss.item(), rel=2e-2), backend
        for name, p in model.named_parameters():
            if name in want:
                # bf16 products (8-bit mantissa): a few percent of the gradient's norm
                assert relative_error(p.grad, want[name]) < 0.08, (backend, name)


def test_an_moe_layer_never_reads_the_device_on_the_host():
    cfg = get_preset("tiny-moe", kernels=kernels.resolve("auto", CUDA))
    layer = MoEFeedForward(cfg).to(CUDA).train()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(8, 256, cfg.n_embd, device=CUDA, requires_grad=True)
    for sync_mode in ("default", "error"):  # the first pass allocates and warms up, unchecked
        torch.cuda.set_sync_debug_mode(sync_mode)
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out, stats = layer(x)
            (out.float().square().mean() + stats.load_balance_loss).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(x.grad).all()


def test_training_steps_between_logging_intervals_never_wait_for_the_gpu(data_dir, tmp_path):
    trainer = Trainer(get_preset("debug", vocab_size=512, block_size=64, n_experts=0), quiet(max_steps=6),
                      tmp_path / "r", data_dir)
    trainer.train_step().read()  # allocations, cuBLAS handles: outside the check
    pending = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            pending.append(trainer.train_step())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    steps = [p.read() for p in pending]
    assert all(s is not None and math.isfinite(s["loss"]) for s in steps)


def test_fp16_with_the_gradient_scaler_trains_and_resumes(data_dir, tmp_path):
    cfg = get_preset("debug", vocab_size=512, block_size=64)
    run = tmp_path / "run"
    trainer = Trainer(cfg, quiet(precision="fp16", max_steps=60, eval_every=60, lr=3e-3), run, data_dir)
    start = trainer.evaluate()["loss"]
    result = trainer.fit()
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() > 0
    assert result["last_eval"]["loss"] < start - 0.3
    resumed = Trainer(cfg, quiet(precision="fp16", max_steps=65, eval_every=65, lr=3e-3), run, data_dir,
                      resume_from=run)
    assert resumed.scaler.get_scale() == trainer.scaler.get_scale()  # the scaler's state came back
    assert resumed.fit()["step"] == 65


def test_fp16_overflow_skips_the_step_and_lowers_the_scale(data_dir, tmp_path):
    trainer = Trainer(get_preset("debug", vocab_size=512, block_size=64), quiet(precision="fp16", max_steps=3),
                      tmp_path / "r", data_dir)
    trainer.train_step().read()  # the scaler starts its scale at the first step
    trainer.scaler.update(new_scale=2.0**40)  # fp16 gradients overflow at this scale
    before = copy.deepcopy(trainer.model.state_dict())
    trainer.train_step().read()
    assert trainer.scaler.get_scale() < 2.0**40
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_compile_trains_like_eager_on_cuda(data_dir, tmp_path):
    cfg = get_preset("debug", vocab_size=512, block_size=64, dropout=0.0)
    eager = Trainer(cfg, quiet(max_steps=5), tmp_path / "eager", data_dir)
    compiled = Trainer(cfg, quiet(max_steps=5, compile=True), tmp_path / "compiled", data_dir)
    for _ in range(5):
        a, b = eager.train_step().read(), compiled.train_step().read()
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2)
