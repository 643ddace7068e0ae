"""Hostile command-line input, config files and data, through the CLI in a subprocess: each is a
one-line error that names what to change (no traceback), and nothing is left half-changed."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from hostile_helpers import cli, cli_env, copy_run, snapshot

from nanomoe import runtime

STEP2 = "checkpoints/step-00000002"


# --- config files and --set -------------------------------------------------------------------

@pytest.mark.parametrize("text, needles", [
    ("[training]\nlr = 1e-3\n", ["unknown section or key 'training'", "did you mean 'train'"]),
    ("[modle]\nn_layer = 2\n", ["unknown section or key 'modle'", "did you mean 'model'"]),
    ('preset = "debug"\n[train]\nlrr = 1e-3\n', ["unknown TrainConfig field 'lrr'", "did you mean 'lr'"]),
    ('preset = "debug"\n[model]\nn_layer = "four"\n', ["ModelConfig field n_layer must be an integer", "'four'"]),
    ('preset = "debug"\n[train]\nlr = nan\n', ["field lr must be a finite number"]),
    ("n_head = 4\n[train]\nlr = 1e-3\n", ["n_head is a model field: put it under [model]"]),
])
def test_config_file_mistakes_name_the_fix(text, needles, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(text)
    cli("train", "--config", config, "--out", tmp_path / "run", "--max-steps", "1").expect(*needles)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, needles", [
    (["--set", "lr=nan"], ["lr='nan'", "must be a finite number"]),
    (["--set", "lr=inf"], ["lr='inf'", "must be a finite number"]),
    (["--set", "lrr=1e-3"], ["'lrr' is neither a model nor a training field", "did you mean 'lr'"]),
    (["--set", "n_layer=2.5"], ["n_layer='2.5'", "an integer"]),
])
def test_set_values_are_checked_numbers(args, needles, tmp_path):
    cli("train", "--preset", "debug", "--out", tmp_path / "run", "--max-steps", "1", *args).expect(*needles)


@pytest.mark.parametrize("args, needles", [
    (["generate", "--checkpoint", "RUN", "--temperature", "nan"], ["temperature must be a finite number"]),
    (["generate", "--checkpoint", "RUN", "--top-p", "1.5"], ["top_p must be > 0 and <= 1"]),
    (["params", "--preset", "debug", "--gpus", "-1"], ["--gpus must be >= 1"]),
    (["prepare", "--source", "builtin", "--out", "OUT", "--vocab-size", "0"], ["--vocab-size must be >= 1"]),
    (["train", "--max-steps", "0"], ["--max-steps must be >= 1"]),
])
def test_numeric_flags_are_checked_before_anything_runs(args, needles, tmp_path):
    args = [str(tmp_path / a) if a in ("RUN", "OUT") else a for a in args]
    cli(*args).expect(*needles)
    assert not (tmp_path / "OUT").exists()


def test_an_argument_that_is_not_utf8_is_refused(tiny_run):
    cli("generate", "--checkpoint", tiny_run, "--prompt", b"Once \xff\xfe upon").expect("is not valid UTF-8")


def test_binary_junk_piped_into_chat_does_not_kill_the_session(tiny_run):
    junk = b"Once upon\xff\xfe\x00 a time\n/temp nan\n/temp 0\nThe dog\n"
    result = cli("chat", "--checkpoint", tiny_run, "--max-new-tokens", "3", stdin=junk)
    result.expect("expected a temperature", code=0)
    assert result.out.count("> ") >= 3  # every line was handled, the junk one included


# --- data ---------------------------------------------------------------------------------------

def test_token_ids_beyond_the_vocab_are_refused_by_train_and_eval(tiny_data, tiny_run, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    meta = json.loads((data / "meta.json").read_text())
    tokens = np.memmap(data / "train.bin", dtype=meta["dtype"], mode="r+")
    tokens[100] = meta["vocab_size"] + 7
    tokens.flush()
    del tokens
    needle = f"holds token id {meta['vocab_size'] + 7}"
    cli("train", "--preset", "debug", "--data", data, "--out", tmp_path / "run", "--max-steps", "1").expect(needle)
    cli("eval", "--checkpoint", tiny_run, "--data", data, "--split", "train", "--max-batches", "1").expect(needle)


def test_a_one_document_corpus_says_the_document_went_to_validation(tmp_path):
    (tmp_path / "one.txt").write_text("Once upon a time there was a cat.\n")
    cli("prepare", "--source", tmp_path / "one.txt", "--out", tmp_path / "out", "--vocab-size", "300").expect(
        "too few documents", "at least 2")


def test_a_binary_file_as_tokenizer_is_named(tiny_data, tmp_path):
    (tmp_path / "stories.txt").write_text("Once upon a time.\n\nThe end.\n")
    cli("prepare", "--source", tmp_path / "stories.txt", "--out", tmp_path / "out",
        "--tokenizer", tiny_data / "train.bin").expect("train.bin is not a tokenizer file", "tokenizer.json")


def test_a_long_single_line_document_is_prepared_in_bounded_memory(tmp_path):
    """6.6 MB on one line: whole, the tokenizer held ~870 MB at once (9.3 GB for 50 MB); in pieces
    the whole process stays near its baseline. Measured in a child of a child, so the test
    process's other subprocesses do not count."""
    words = ["the", "little", "dog", "ran", "to", "park", "and", "saw", "a", "big", "red", "ball"]
    rng = np.random.default_rng(0)
    text = " ".join(words[i] for i in rng.integers(0, len(words), 1_500_000))
    source = tmp_path / "long.txt"
    source.write_text(text + "\n" + "Another small story about a cat.\n" * 3)
    measure = (
        "import resource, subprocess, sys\n"
        "code = subprocess.run(sys.argv[1:], capture_output=True).returncode\n"
        "print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", measure, sys.executable, "-m", "nanomoe", "prepare", "--source", str(source),
         "--out", str(tmp_path / "out"), "--vocab-size", "300", "--separator", "line", "--no-progress"],
        capture_output=True, text=True, env=cli_env(), timeout=300,
    ).stdout.split()
    code, peak_mb = int(out[0]), int(out[1])
    assert code == 0
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["splits"]["val"]["documents"] + meta["splits"]["train"]["documents"] == 4
    assert peak_mb < 650, peak_mb


# --- checkpoints the user edited ----------------------------------------------------------------

def test_an_edited_model_config_is_refused_before_allocating(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    for d in (run / "checkpoints").iterdir():  # 51 GB of weights if it were allocated
        config = json.loads((d / "model_config.json").read_text())
        (d / "model_config.json").write_text(json.dumps({**config, "n_embd": 65536, "n_head": 512, "n_kv_head": 512}))
        from nanomoe.training import manifest

        manifest.write_manifest(d)
    for args in (["generate", "--checkpoint", run, "--prompt", "Once", "--max-new-tokens", "2"],
                 ["train", "--resume", run, "--max-steps", "6", "--no-progress"]):
        cli(*args).expect("holds a different model", "model_config.json")


def test_export_force_replaces_its_own_files_and_keeps_the_users(tiny_run, tmp_path):
    out = tmp_path / "export"
    cli("export", "--checkpoint", tiny_run, "--out", out).expect(code=0)
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    cli("export", "--checkpoint", tiny_run, "--out", out, "--force").expect("notes.txt", "move them elsewhere")
    assert snapshot(out) == before
    (out / "notes.txt").unlink()
    cli("export", "--checkpoint", tiny_run, "--out", out, "--force").expect(code=0)


def test_metrics_are_logged_once_per_step_after_a_resume_from_an_earlier_checkpoint(tiny_run, tmp_path):
    """What a kill -9 leaves: rows logged after the last checkpoint. The resumed run logs those
    steps again; the file must hold each (kind, step) once."""
    run = copy_run(tiny_run, tmp_path / "run")
    (run / "latest.json").write_text(json.dumps({"checkpoint": STEP2, "step": 2}))
    cli("train", "--resume", run, "--max-steps", "4", "--no-progress").expect(code=0)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["kind"], r["step"]) for r in rows]
    assert len(keys) == len(set(keys)), keys
    assert {s for k, s in keys if k == "train"} == {1, 2, 3, 4}


def test_a_full_disk_is_reported_in_words(tiny_data, tmp_path, monkeypatch, capsys):
    """torch's zip writer reports a short write as 'unexpected pos'; say what it means."""
    import torch

    from nanomoe.cli import main

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full)
    assert main(["train", "--preset", "debug", "--data", str(tiny_data), "--out", str(tmp_path / "run"),
                 "--max-steps", "1", "--no-progress", "--set", "samples=0", "--set", "block_size=32"]) == 1
    err = capsys.readouterr().err
    assert "no space left on device" in err and "Free some space or pass another --out" in err


# --- devices ------------------------------------------------------------------------------------

def fake_nvidia_smi(tmp_path) -> dict[str, str]:
    """An environment in which an NVIDIA driver looks installed (nvidia-smi on the PATH)."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def no_gpu_here():
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: these are the errors of a machine without one")


@pytest.mark.parametrize("fake_driver, needles", [
    (False, ["--device cuda was requested but no CUDA GPU is available; use --device cpu"]),
    (True, ["is the CPU build; install the CUDA build with: bash scripts/setup.sh --cuda"]),
])
def test_device_cuda_without_a_usable_gpu_is_one_line_before_any_work(fake_driver, needles, tmp_path):
    no_gpu_here()
    env = fake_nvidia_smi(tmp_path) if fake_driver and torch.version.cuda is None else None
    if fake_driver and env is None:
        pytest.skip("torch here is a CUDA build")
    result = cli("train", "--device", "cuda", "--data", tmp_path / "no-data", "--out", tmp_path / "run", env=env)
    result.expect(*needles)
    assert len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_fp16_on_the_cpu_is_one_line_before_any_work(tmp_path):
    result = cli("train", "--device", "cpu", "--set", "precision=fp16", "--data", tmp_path / "no-data",
                 "--out", tmp_path / "run")
    result.expect("precision fp16 needs a GPU", "this run is on the cpu: use --set precision=bf16")
    assert len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_device_auto_with_a_gpu_but_cpu_torch_says_so_and_trains_on_the_cpu(tiny_data, tmp_path):
    no_gpu_here()
    if torch.version.cuda is not None:
        pytest.skip("torch here is a CUDA build")
    args = ("train", "--preset", "debug", "--data", tiny_data, "--out", tmp_path / "run", "--max-steps", "1",
            "--no-progress", "--set", "block_size=32", "--set", "samples=0")
    result = cli(*args, env=fake_nvidia_smi(tmp_path))
    result.expect("training on the CPU: an NVIDIA GPU is visible but torch", "bash scripts/setup.sh --cuda", code=0)
    assert sum("NVIDIA GPU is visible" in line for line in result.err.splitlines()) == 1
    assert "model on cpu (" in result.out  # the device it picked, in its first line
    if runtime.cpu_torch_on_a_gpu_machine():
        return  # this machine really has a driver: no run without one to compare
    plain = cli(*args[:6], tmp_path / "plain", *args[7:])
    plain.expect(code=0)
    assert "NVIDIA GPU is visible" not in plain.out + plain.err


@pytest.mark.parametrize("cuda_build, smi, dev_file, expected", [
    (None, True, False, True),  # the driver's tool on the PATH, CPU torch
    (None, False, True, True),  # the device file only (a container without nvidia-smi)
    (None, False, False, False),  # no GPU at all
    ("12.8", True, True, False),  # the CUDA build: nothing to fix
])
def test_cpu_torch_on_a_gpu_machine_is_detected(monkeypatch, tmp_path, cuda_build, smi, dev_file, expected):
    monkeypatch.setattr(torch.version, "cuda", cuda_build)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}" if smi and name == "nvidia-smi" else None)
    device_file = tmp_path / "nvidia0"
    if dev_file:
        device_file.touch()
    monkeypatch.setattr(runtime, "NVIDIA_DEVICE_FILE", device_file)
    assert runtime.cpu_torch_on_a_gpu_machine() is expected
