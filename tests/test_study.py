"""`nanomoe study`: interleaved speed measurement, equal-budget step counts, whole-split evaluation,
study.json / study.md / study.png, optional W&B logging (offline), and clear errors."""

import json

import pytest
import torch

from nanomoe.cli import main
from nanomoe.cli.study import label_of, parse_run_spec
from nanomoe.data import prepare_data
from nanomoe.errors import ConfigError
from nanomoe.study import WARMUP_ROUNDS, measure_interleaved

SMALL = ["--set", "block_size=32", "--set", "batch_size=4", "--set", "eval_batches=2", "--set", "precision=fp32"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "stories"
    return prepare_data("builtin:0.4", out, vocab_size=512, progress=False)


def test_runs_take_turns_and_each_is_timed_separately(monkeypatch):
    import nanomoe.study as study

    now = [0.0]
    monkeypatch.setattr(study.time, "perf_counter", lambda: now[0])
    calls = []

    class Fake:
        def __init__(self, name, cost):
            self.name, self.cost = name, cost
            self.device = torch.device("cpu")

        def train_step(self):
            calls.append(self.name)
            now[0] += self.cost

    times = measure_interleaved([Fake("a", 1.0), Fake("b", 3.0)], rounds=3)
    assert times == [[1.0] * 3, [3.0] * 3]  # warm-up rounds are not timed
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a", "a", "b"][: 2 * (WARMUP_ROUNDS + 3)]


def test_run_specs_parse_and_bad_ones_are_clear():
    assert parse_run_spec("tiny-moe") == ("tiny-moe", [])
    assert parse_run_spec("tiny-moe:optimizer=muon, lr=1e-2") == ("tiny-moe", ["optimizer=muon", "lr=1e-2"])
    assert label_of("tiny-moe:optimizer=muon,lr=1e-2") == "tiny-moe__optimizer=muon_lr=1e-2"
    with pytest.raises(ConfigError, match="PRESET:key=value"):
        parse_run_spec("tiny-moe:muon")


def test_smoke_study_writes_json_table_and_plot(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "study"
    assert main(["study", "--data", str(data_dir), "--minutes", "0.05", "--runs", "debug", "debug-dense:lr=1e-3",
                 "--rounds", "2", "--out", str(out), *SMALL, "--set", "wandb_project=nanomoe-test"]) == 0
    printed = capsys.readouterr().out
    assert "interleaved" in printed and "| debug |" in printed
    study = json.loads((out / "study.json").read_text())
    assert study["budget_seconds"] == pytest.approx(3.0) and "median of 2 steps" in study["method"]
    runs = {r["label"]: r for r in study["runs"]}
    assert set(runs) == {"debug", "debug-dense__lr=1e-3"}
    first = study["runs"][0]["seconds_per_step"]
    for r in runs.values():
        assert len(r["measured_step_seconds"]) == 2
        assert r["steps"] == max(1, int(3.0 // r["seconds_per_step"]))  # what the budget buys at its speed
        assert r["step_time_ratio"] == pytest.approx(r["seconds_per_step"] / first)
        assert r["tokens"] > 0 and r["val_bits_per_byte"] > 0 and r["curve"]
        # the final evaluation covers the whole validation split, more than the periodic 2 batches
        assert r["val_tokens"] > 2 * 4 * 32
    assert runs["debug-dense__lr=1e-3"]["train"]["lr"] == 1e-3 and runs["debug"]["model"]["n_experts"] == 4
    table = (out / "study.md").read_text()
    assert "| debug-dense__lr=1e-3 |" in table and "val bits/byte" in table
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # W&B, offline: one run per training run and one for the study
    for where in (out / "debug", out / "debug-dense__lr=1e-3", out):
        assert list((where / "wandb").glob("offline-run-*/run-*.wandb")), where


def test_data_dirs_with_different_tokenizers_are_refused(data_dir, tmp_path, capsys):
    other = prepare_data("builtin:0.4", tmp_path / "other", vocab_size=300, progress=False)
    assert main(["study", "--data", str(data_dir), "--minutes", "0.05", "--runs", "debug", f"debug-dense:data={other}",
                 "--out", str(tmp_path / "s"), *SMALL]) == 1
    err = capsys.readouterr().err
    assert "different tokenizers" in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()


def test_every_study_in_the_search_script_is_a_valid_set_of_runs(data_dir, tmp_path):
    # scripts/studies.sh with a stand-in for nanomoe that records each command line
    import subprocess
    from pathlib import Path

    from nanomoe.cli.study import build_runs

    log = tmp_path / "calls"
    stub = tmp_path / "nanomoe"
    stub.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    stub.chmod(0o755)
    script = Path(__file__).parent.parent / "scripts" / "studies.sh"
    subprocess.run(["bash", str(script)], check=True, env={"PATH": "/usr/bin:/bin", "NANOMOE": str(stub),
                                                          "DATA": str(data_dir)})
    calls = [line.split() for line in log.read_text().splitlines()]

    def sets(call):  # the --set values common to a study's runs
        return [call[i + 1] for i, word in enumerate(call) if word == "--set"]

    assert len(calls) == 23 and all(c[0] == "study" for c in calls)
    minutes = {call[call.index("--out") + 1].split("/")[-1].rsplit("-", 1)[0]: call[call.index("--minutes") + 1]
               for call in calls}
    screening_names = ("screen-5min", "screen2-5min", "screen3-5min", "screen4-5min", "screen5-5min")
    screenings = {minutes[name] for name in screening_names}
    assert screenings == {"5"}  # the screenings' own budget; the size studies and the final at the issue's
    at_the_issues_budget = ("final", "size", "size2", "size3", "screen6", "budget-final", "screen7", "screen8")
    assert [minutes[f"{name}-10min"] for name in at_the_issues_budget] == ["10"] * len(at_the_issues_budget)
    final = next(call for call in calls if "/final-" in call[call.index("--out") + 1])
    assert final[final.index("--rounds") + 1] == "20"
    for call in calls:
        specs = call[call.index("--runs") + 1:]
        common = sets(call)
        assert "lr=3e-3" in common  # the search's base lr, whatever the default recipe's is now
        runs = build_runs(specs, [*common, "block_size=32"], "default", str(data_dir))  # every field is valid
        assert len(runs) == len(specs) >= 2
    # the final's winners: the MoE's own lr wins over the search's base lr, the dense twin keeps 3e-3
    moe, dense = build_runs(final[final.index("--runs") + 1:], [*sets(final), "block_size=32"], "default",
                            str(data_dir))
    assert (moe.train_config.lr, moe.train_config.optimizer) == (2e-3, "adamw")
    assert (dense.train_config.lr, dense.train_config.optimizer) == (3e-3, "muon")
