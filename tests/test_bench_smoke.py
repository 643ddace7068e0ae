"""Benchmarks run end to end on a tiny shape and print what they promise. No timings are asserted."""

import importlib.util
import json
from pathlib import Path

import pytest

from nanomoe.cli import main


def test_bench_moe_json_has_the_headline_keys(capsys):
    argv = ["bench", "moe", "--json", "--batches", "2", "--tokens", "64", "--n-embd", "16", "--expert-hidden", "32", "--n-experts", "4"]
    # --malloc default: leave the test process's allocator alone
    assert main(argv + ["--repeats", "1", "--warmup", "0", "--threads", "1", "--malloc", "default"]) == 0
    report = json.loads(capsys.readouterr().out)
    keys = ["ratio_vs_dense_bf16", "ratio_vs_dense_fp32", "speedup_vs_reference_bf16", "ratio_grouped_mm_vs_loop_bf16",
            "ratio_grouped_mm_vs_loop_fp32"]
    if importlib.util.find_spec("transformers") is not None:
        keys.append("speedup_vs_hf_bf16")
        # same weights, same function: Hugging Face's block must agree with nanomoe's reference loop
        assert report["max_abs_diff_vs_reference_fp32"]["hf"] < 1e-5
    for key in keys:
        assert report[key] > 0, key
    for name in ("nanomoe", "torch_grouped_mm", "torch_loop"):
        assert report["max_abs_diff_vs_reference_fp32"][name] < 1e-5, name
    assert report["shape"]["n_experts"] == 4


def test_bench_train_json_has_the_headline_keys(tmp_path, monkeypatch, capsys):
    import nanomoe.data
    from nanomoe.data import prepare_data

    data = prepare_data("builtin:0.15", tmp_path / "data", vocab_size=300, progress=False)
    monkeypatch.setattr(nanomoe.data, "builtin_corpus_dir", lambda: data)  # instead of the 10 MB default
    argv = ["bench", "train", "--preset", "debug", "--dense-preset", "debug-dense", "--steps", "3", "--warmup", "0",
            "--batch-size", "2", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens_per_s"] > 0 and 0 < report["mfu"] and report["moe_over_dense_step_time"] > 0
    # the step-by-step ratio pairs each MoE step with the dense step taken right after it
    moe, dense = (report["models"][p]["step_seconds_each"] for p in ("debug", "debug-dense"))
    assert len(moe) == len(dense) == 3
    assert report["moe_over_dense_step_time_pairwise"] == pytest.approx(sorted(m / d for m, d in zip(moe, dense))[1])
    assert report["models"]["debug"]["step_seconds"] == pytest.approx(sorted(moe)[1])
    # the peak is the best of the sizes measured, all reported
    assert report["peak_flops"] == max(report["peak_flops_by_size"].values())
    assert set(report["peak_flops_by_size"]) == {"1024", "2048", "4096"}


def load_benchmark(name: str, monkeypatch, folder: str = "research"):
    """<folder>/<name>.py as a module (the scripts import their neighbours by plain name)."""
    root = Path(__file__).resolve().parents[1] / folder
    monkeypatch.syspath_prepend(str(root))
    spec = importlib.util.spec_from_file_location(name, root / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_memory_bandwidth_script_reports_every_pass(monkeypatch, capsys):
    script = load_benchmark("memory_bandwidth", monkeypatch)
    monkeypatch.setattr("sys.argv", ["memory_bandwidth.py", "--mb", "4", "--repeats", "1", "--json"])
    script.main()
    report = json.loads(capsys.readouterr().out)
    assert "1" in report["gb_per_s_by_threads"]
    for rates in report["gb_per_s_by_threads"].values():
        assert set(rates) == {"copy", "read", "write"} and all(r > 0 for r in rates.values())


def test_parameter_passes_script_reports_the_floor(tmp_path, monkeypatch, capsys):
    from nanomoe.data import prepare_data

    script = load_benchmark("parameter_passes", monkeypatch)
    data = prepare_data("builtin:0.15", tmp_path / "data", vocab_size=300, progress=False)
    monkeypatch.setattr(script, "builtin_corpus_dir", lambda: data)
    monkeypatch.setattr("sys.argv", ["parameter_passes.py", "--moe-preset", "debug", "--dense-preset", "debug-dense",
                                     "--repeats", "1", "--steps", "1", "--json"])
    script.main()
    report = json.loads(capsys.readouterr().out)
    moe, dense = report["presets"]["debug"], report["presets"]["debug-dense"]
    assert moe["parameters"] > dense["parameters"]  # 4 experts vs one FFN of the same active width
    assert set(moe["ms"]) == {"adamw", "grad_norm", "weight_casts", "grad_copies"}
    assert moe["total_ms"] == pytest.approx(sum(moe["ms"].values()))
    extra = moe["total_ms"] - dense["total_ms"]
    assert report["moe_over_dense_floor"] == pytest.approx((report["dense_step_ms"] + extra) / report["dense_step_ms"])


def test_bench_peak_json_names_the_peak_and_its_source(tmp_path, monkeypatch, capsys):
    import nanomoe.mfu

    monkeypatch.setenv("NANOMOE_CACHE", str(tmp_path))
    monkeypatch.setattr(nanomoe.mfu, "matmul_flops", lambda size, device, repeats=5: size * 1e9)
    assert main(["bench", "peak", "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["peak_flops"] == 4096e9 and report["source"] == "measured"
    assert report["peak_flops_by_size"] == {"1024": 1024e9, "2048": 2048e9, "4096": 4096e9}
    assert (tmp_path / "peak_flops.json").is_file()  # measured once, then cached


def test_newton_schulz_script_times_every_expert_matrix_of_the_preset(monkeypatch, capsys):
    script = load_benchmark("bench_newton_schulz", monkeypatch, folder="scripts")
    monkeypatch.setattr("sys.argv", ["bench_newton_schulz.py", "--presets", "debug", "--rounds", "1"])
    script.main()
    report = json.loads(capsys.readouterr().out)
    # debug: 2 MoE layers, 4 experts, each with w_in (64, 256: swiglu's gate and up) and w_out (128, 64)
    assert report["preset"] == "debug" and report["matrices"] == 2 * 2 * 4
    assert report["shapes"] == [[64, 256], [128, 64]]
    assert report["per_matrix_s"] > 0 and report["batched_s"] > 0
