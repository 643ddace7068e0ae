"""Hostile checkpoints and run directories, through the CLI in a subprocess: no code runs from a
checkpoint, damaged or foreign parts are refused by name (or skipped for an older good checkpoint),
one writer per run directory, and a second signal never cuts the final save short."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from hostile_helpers import REPO, cli, cli_env, copy_run, plant_pickle, snapshot

from nanomoe.errors import CheckpointError
from nanomoe.training import checkpoint as ckpt
from nanomoe.training import manifest

STEP2, STEP4 = "checkpoints/step-00000002", "checkpoints/step-00000004"


def legacy(run, *, drop_weights: bool):
    """Make the run's checkpoints look written before manifests (format 1), so nothing but the
    loaders themselves stands between a planted file and the unpickler."""
    for d in (run / STEP2, run / STEP4):
        (d / manifest.MANIFEST).unlink()
        state = json.loads((d / "trainer_state.json").read_text())
        (d / "trainer_state.json").write_text(json.dumps({**state, "format": 1}))
        if drop_weights:
            (d / "model.safetensors").unlink()


ENTRY_POINTS = {
    "train --resume": lambda run, tmp: ["train", "--resume", run, "--max-steps", "6", "--no-progress"],
    "eval": lambda run, tmp: ["eval", "--checkpoint", run, "--max-batches", "1", "--no-progress"],
    "generate": lambda run, tmp: ["generate", "--checkpoint", run, "--prompt", "Once", "--max-new-tokens", "2"],
    "chat": lambda run, tmp: ["chat", "--checkpoint", run],
    "experts": lambda run, tmp: ["experts", "--checkpoint", run, "--out", tmp / "report", "--max-batches", "1"],
    "export": lambda run, tmp: ["export", "--checkpoint", run, "--out", tmp / "export"],
    "checkpoint consolidate": lambda run, tmp: ["checkpoint", "consolidate", run],
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_a_pickle_planted_as_sharded_metadata_never_runs(entry, tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    legacy(run, drop_weights=entry != "train --resume")  # resume reads sharded/ even beside the weights
    marker = tmp_path / "PWNED"
    for d in (STEP2, STEP4):
        plant_pickle(run / d / "sharded" / ".metadata", marker)
    result = cli(*ENTRY_POINTS[entry](run, tmp_path), stdin="Once\n")
    assert not marker.exists(), f"{entry} executed code from a checkpoint"
    result.expect("refusing to read", ".metadata", "use another checkpoint")


def test_load_checkpoint_in_python_refuses_the_planted_pickle(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    legacy(run, drop_weights=True)
    marker = tmp_path / "PWNED"
    plant_pickle(run / STEP4 / "sharded" / ".metadata", marker)
    with pytest.raises(CheckpointError, match="refusing to read"):
        ckpt.load_checkpoint(run)
    assert not marker.exists()


def test_non_tensor_entries_of_a_sharded_checkpoint_are_read_without_unpickling_objects(tmp_path):
    """DCP stores AdamW's lr/betas with torch.save; torch's own planner reads them back with
    weights_only=False. A crafted entry must be refused, not run."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from hostile_helpers import RunsCode

    from nanomoe import safe_dcp

    marker = tmp_path / "PWNED"
    sharded = tmp_path / "sharded"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(2), "lr": RunsCode(marker)}, checkpoint_id=sharded, no_dist=True)
        state = {"w": torch.zeros(2), "lr": 0.0}
        with pytest.raises(BaseException) as info:  # DCP wraps the reader's refusal in CheckpointException
            safe_dcp.load(state, sharded, no_dist=True)
    assert not marker.exists()
    assert "Unsupported global" in str(info.value) or "weights_only" in str(info.value)
    honest = tmp_path / "honest"  # numbers, tuples and tensors still load
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(2), "lr": 0.5, "betas": (0.9, 0.95)}, checkpoint_id=honest, no_dist=True)
        state = {"w": torch.zeros(2), "lr": 0.0, "betas": (0.0, 0.0)}
        safe_dcp.load(state, honest, no_dist=True)
    assert state["lr"] == 0.5 and tuple(state["betas"]) == (0.9, 0.95) and torch.equal(state["w"], torch.ones(2))


def test_a_file_added_to_a_checkpoint_is_refused_by_its_manifest(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    marker = tmp_path / "PWNED"
    plant_pickle(run / STEP4 / "sharded" / ".metadata", marker)
    result = cli("generate", "--checkpoint", run, "--prompt", "Once", "--max-new-tokens", "2")
    result.expect("sharded/.metadata was not written with the checkpoint", STEP2)
    assert not marker.exists()


def test_flipped_bytes_are_named_and_resume_falls_back_to_the_newest_good_checkpoint(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    weights = run / STEP4 / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # a weight, not the header: only the hash can tell
    weights.write_bytes(bytes(data))
    verify = cli("checkpoint", "verify", run)
    verify.expect("step-00000004: DAMAGED: model.safetensors does not match its sha256",
                              f"The newest checkpoint that verifies is {run / STEP2}")
    assert "step-00000002: ok" in verify.out
    resumed = cli("train", "--resume", run, "--max-steps", "3", "--no-progress")
    resumed.expect("is damaged", f"resuming from {run / STEP2}", code=0)
    assert json.loads((run / "latest.json").read_text())["step"] == 3
    assert cli("checkpoint", "verify", run / "checkpoints/step-00000003").code == 0


def test_a_truncated_weights_file_is_named_by_every_loader(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    weights = run / STEP4 / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = cli("generate", "--checkpoint", run, "--prompt", "Once", "--max-new-tokens", "2")
    result.expect("model.safetensors has 1000 bytes", "truncated", STEP2)


def test_missing_optimizer_state_is_an_error_unless_reset_is_asked_for(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    for d in (STEP2, STEP4):  # as `checkpoint consolidate --out` writes them: consistent, without AdamW state
        (run / d / "optimizer.pt").unlink()
        manifest.write_manifest(run / d)
    before = snapshot(run)
    refused = cli("train", "--resume", run, "--max-steps", "5", "--no-progress")
    refused.expect("has no optimizer.pt", "--reset-missing-state")
    assert snapshot(run) == before
    cli("train", "--resume", run, "--max-steps", "5", "--no-progress", "--reset-missing-state").expect(
        "starting AdamW's moments afresh", code=0)


@pytest.mark.parametrize("content, needle", [
    ("[]", "latest.json is damaged"),
    ('{"checkpoint": "../other/checkpoints/step-00000004"}', "not a checkpoint of this run"),
    ("{not json", "latest.json is not valid JSON"),
])
def test_broken_or_escaping_pointers_are_refused(content, needle, tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    other = copy_run(tiny_run, tmp_path / "other")
    (run / "latest.json").write_text(content)
    before = snapshot(other)
    cli("train", "--resume", run, "--max-steps", "6", "--no-progress").expect(needle)
    assert snapshot(other) == before  # the other run is never trained or written to


def test_resume_with_data_of_another_tokenizer_is_refused(tiny_run, tmp_path):
    from nanomoe.data import prepare_data

    other = prepare_data("builtin:0.1", tmp_path / "other-data", vocab_size=300, progress=False)
    run = copy_run(tiny_run, tmp_path / "run")
    before = snapshot(run)
    cli("train", "--resume", run, "--data", other, "--max-steps", "6", "--no-progress").expect(
        "prepared with a different tokenizer")
    assert snapshot(run) == before


def _wait_for_holder(run, proc, seconds=90):
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        lock = run / ".lock"
        if lock.is_file() and lock.read_text().strip() and (run / "checkpoints/step-00000005").is_dir():
            return
        time.sleep(0.2)
    raise AssertionError(f"the training did not start (exit {proc.poll()})")


def _start_training(run):
    return subprocess.Popen([sys.executable, "-m", "nanomoe", "train", "--resume", str(run), "--max-steps", "100000",
                             "--no-progress", "--set", "save_every=1", "--set", "eval_every=100000"],
                            cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_a_second_training_into_the_same_run_is_refused_and_a_dead_holder_is_reported(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    first = _start_training(run)
    try:
        _wait_for_holder(run, first)
        second = cli("train", "--resume", run, "--max-steps", "6", "--no-progress")
        second.expect("is being written by another training", f"pid {first.pid}")
    finally:
        first.kill()
        first.wait()
    again = cli("train", "--resume", run, "--max-steps", "1", "--no-progress")  # kill -9 left the lock file
    again.expect(f"stale lock {run / '.lock'} from pid {first.pid}", code=0)


def test_a_second_sigterm_waits_for_the_final_save(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    proc = _start_training(run)
    try:
        _wait_for_holder(run, proc)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    # the second signal must not cut the save short: the run ends as stopped (130), or, when the
    # save had already finished, the second signal may end the exiting process; the save is whole
    saved = "stopped by SIGTERM at step" in err.decode()
    assert proc.returncode == 130 or (proc.returncode == -signal.SIGTERM and saved), err.decode()
    step = json.loads((run / "latest.json").read_text())["step"]
    assert cli("checkpoint", "verify", run / f"checkpoints/step-{step:08d}").code == 0


def test_stop_request_ignores_signals_while_the_final_save_runs(caplog):
    from nanomoe.training.trainer import StopRequest

    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        stop.saving = True
        os.kill(os.getpid(), signal.SIGINT)  # would be KeyboardInterrupt outside the save
        os.kill(os.getpid(), signal.SIGTERM)
        stop.saving = False
    assert caplog.text.count("waiting for it to finish") == 1


def test_checkpoint_files_have_the_usual_permissions(tiny_run):
    umask = os.umask(0)
    os.umask(umask)
    for f in (tiny_run / STEP4).iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f


def test_without_a_manifest_damaged_state_and_a_swapped_tokenizer_are_still_named(tiny_run, tmp_path):
    """Older checkpoints carry no manifest: the loaders themselves still refuse by name."""
    run = copy_run(tiny_run, tmp_path / "run")
    legacy(run, drop_weights=False)
    optimizer = run / STEP4 / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:5000])
    cli("train", "--resume", run, "--max-steps", "6", "--no-progress").expect(
        f"cannot read {optimizer}", "resume from an earlier checkpoint")
    tokenizer = run / STEP2 / "tokenizer.json"  # a foreign one: two tokens swap ids
    data = json.loads(tokenizer.read_text())
    vocab = data["model"]["vocab"]
    a, b = [k for k, i in vocab.items() if i in (300, 301)]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    tokenizer.write_text(json.dumps(data))
    cli("generate", "--checkpoint", run / STEP2, "--prompt", "Once", "--max-new-tokens", "2").expect(
        "is not the tokenizer the weights were trained with")
