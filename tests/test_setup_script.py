"""scripts/setup.sh refuses options it does not know before touching the environment, and installs in
the order that keeps a fresh install short."""

import subprocess
from pathlib import Path

import pytest

SETUP = Path(__file__).parent.parent / "scripts" / "setup.sh"
TEST_SCRIPT = SETUP.parent / "test.sh"


@pytest.mark.parametrize("args, env, message", [
    (["--gpu"], {}, "unknown option --gpu (use --cpu, --cuda or --no-dev)"),
    ([], {"NANOMOE_TORCH": "rocm"}, "NANOMOE_TORCH must be cpu or cuda, not 'rocm'"),
])
def test_setup_refuses_unknown_torch_builds(tmp_path, args, env, message):
    venv = tmp_path / "venv"
    proc = subprocess.run(["bash", str(SETUP), *args], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "NANOMOE_VENV": str(venv), **env})
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not venv.exists()  # refused before creating anything


def fake_venv(tmp_path, torch_installed: bool) -> tuple[Path, Path]:
    """A venv whose python records every call instead of running it (`-c` answers the torch probe)."""
    venv, log = tmp_path / "venv", tmp_path / "calls.log"
    (venv / "bin").mkdir(parents=True)
    probe = "echo cpu" if torch_installed else "exit 1"
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/bash\nif [ "$1" = -c ]; then {probe}; fi\necho "$*" >> {log}\n')
    python.chmod(0o755)
    return venv, log


@pytest.mark.parametrize("args, extras", [([], ".[dev]"), (["--no-dev"], ".")])
def test_setup_asks_local_indexes_first_and_never_byte_compiles(tmp_path, args, extras):
    venv, log = fake_venv(tmp_path, torch_installed=False)
    proc = subprocess.run(["bash", str(SETUP), *args], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "NANOMOE_VENV": str(venv)})
    assert proc.returncode == 0, proc.stderr
    installs = [line.split() for line in log.read_text().splitlines() if line.startswith("-m pip install")]
    # the CPU build from pip's own sources first: an unreachable extra index costs a minute of retries
    assert installs[0][-1] == "torch==2.13.0+cpu" and "--extra-index-url" not in installs[0]
    assert installs[-1][-2:] == ["-e", extras] and len(installs) == 2  # the first try succeeded
    assert all("--no-compile" in call for call in installs)


def test_setup_keeps_an_installed_torch(tmp_path):
    venv, log = fake_venv(tmp_path, torch_installed=True)
    proc = subprocess.run(["bash", str(SETUP), "--no-dev"], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "NANOMOE_VENV": str(venv)})
    assert proc.returncode == 0, proc.stderr
    installs = [line for line in log.read_text().splitlines() if line.startswith("-m pip install")]
    assert len(installs) == 1 and "torch" not in installs[0]


@pytest.mark.parametrize("dont_write", ["1", None])
def test_the_test_script_lets_the_suites_processes_share_bytecode(tmp_path, dont_write):
    # where Python may not write bytecode, every CLI test's process would compile torch again
    venv, log = fake_venv(tmp_path, torch_installed=True)
    python = venv / "bin" / "python"
    python.write_text(python.read_text().replace(
        'echo "$*"', 'echo "$* | ${PYTHONDONTWRITEBYTECODE-unset} ${PYTHONPYCACHEPREFIX-unset}"'))
    env = {"PATH": "/usr/bin:/bin", "NANOMOE_VENV": str(venv)}
    if dont_write:
        env["PYTHONDONTWRITEBYTECODE"] = dont_write
    proc = subprocess.run(["bash", str(TEST_SCRIPT), "-k", "some_test"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    pytest_call = log.read_text().splitlines()[-1]
    if dont_write:
        assert pytest_call == f"-m pytest -q -k some_test | unset {venv.resolve()}/pycache"
    else:  # Python writes bytecode beside the modules as usual: nothing to change
        assert pytest_call == "-m pytest -q -k some_test | unset unset"
