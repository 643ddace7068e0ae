"""One MFU: the formula, the published GPU peaks, the CPU peak measured once and cached, and the
trainer logging exactly that figure with the peak it used."""

import json

import pytest

from nanomoe import mfu as mfu_module
from nanomoe.mfu import Peak, mfu, peak_flops, published_peak
from nanomoe.params import flops_per_token
from nanomoe.presets import get_preset


def test_mfu_is_model_flops_times_tokens_per_s_over_the_peak():
    cfg = get_preset("tiny-moe")
    peak = Peak(2e12, "measured", "test CPU")
    expected = 10_000 * flops_per_token(cfg, 256)["train"] / 2e12
    assert mfu(cfg, 256, 10_000, peak) == pytest.approx(expected)
    assert mfu(cfg, 256, 20_000, peak) == pytest.approx(2 * expected)


@pytest.mark.parametrize("name, label, tflops", [
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM", 989),
    ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe", 756),
    ("NVIDIA H200", "NVIDIA H200", 989),
    ("NVIDIA A100-SXM4-80GB", "NVIDIA A100", 312),
    ("NVIDIA A100-PCIE-40GB", "NVIDIA A100", 312),
    ("NVIDIA L4", "NVIDIA L4", 121),
    ("NVIDIA L40S", "NVIDIA L40S", 362),
    ("NVIDIA A10", "NVIDIA A10", 125),
    ("NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 4090", 165),
    ("NVIDIA GeForce RTX 3090", "NVIDIA GeForce RTX 3090", 71),
])
def test_published_gpu_peaks(name, label, tflops):
    peak = published_peak(name)
    assert (peak.device, peak.flops / 1e12, peak.source) == (label, tflops, "published")


@pytest.mark.parametrize("name", ["NVIDIA A10G", "Tesla T4", "NVIDIA GeForce RTX 2080"])
def test_unlisted_gpus_are_not_guessed(name):
    assert published_peak(name) is None  # measured instead, like a CPU


def test_cpu_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    calls = []

    def fake_matmul_flops(size, device, repeats=5):
        calls.append(size)
        return {1024: 1e12, 2048: 3e12, 4096: 2e12}[size]

    monkeypatch.setattr(mfu_module, "matmul_flops", fake_matmul_flops)
    first = peak_flops("cpu", cache_dir=tmp_path)
    assert (first.flops, first.source) == (3e12, "measured")
    assert first.by_size == {1024: 1e12, 2048: 3e12, 4096: 2e12}
    assert calls == [1024, 2048, 4096]
    assert peak_flops("cpu", cache_dir=tmp_path) == first  # from the cache: nothing measured
    assert len(calls) == 3
    saved = json.loads((tmp_path / "peak_flops.json").read_text())
    assert [entry["flops"] for entry in saved.values()] == [3e12]

    monkeypatch.setattr(mfu_module, "matmul_flops", lambda size, device, repeats=5: 1e12)
    assert peak_flops("cpu", cache_dir=tmp_path, remeasure=True).flops == 1e12
    assert peak_flops("cpu", cache_dir=tmp_path).flops == 1e12  # the new measurement replaced it


def test_a_damaged_cache_is_measured_again(tmp_path, monkeypatch):
    (tmp_path / "peak_flops.json").write_text("{not json")
    monkeypatch.setattr(mfu_module, "matmul_flops", lambda size, device, repeats=5: 5e11)
    assert peak_flops("cpu", cache_dir=tmp_path).flops == 5e11


def test_matmul_flops_measures_a_real_product():
    import torch

    assert mfu_module.matmul_flops(64, torch.device("cpu"), repeats=1) > 0


def test_trainer_logs_the_one_mfu_and_its_peak(tmp_path, monkeypatch):
    import nanomoe.training.trainer as trainer_module
    from nanomoe.data import prepare_data
    from nanomoe.training.config import TrainConfig
    from nanomoe.training.trainer import Trainer

    peak = Peak(1e12, "measured", "test CPU")
    monkeypatch.setattr(trainer_module, "peak_flops", lambda device: peak)
    data = prepare_data("builtin:0.05", tmp_path / "data", vocab_size=300, progress=False)
    cfg = get_preset("debug-dense", vocab_size=300)
    train_cfg = TrainConfig(batch_size=2, max_steps=2, log_every=1, eval_every=2, eval_batches=1, samples=0,
                            tensorboard=False, plots=False, progress=False, precision="fp32")
    trainer = Trainer(cfg, train_cfg, tmp_path / "run", data)
    trainer.fit()
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["mfu_peak_flops"] == 1e12 and "test CPU" in run["mfu_peak"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert len(train_rows) == 2
    for row in train_rows:
        assert row["mfu"] == pytest.approx(mfu(cfg, trainer.seq_len, row["tokens_per_s"], peak))
