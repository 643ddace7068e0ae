"""scripts/setup.sh refuses options it does not know before touching the environment."""

import subprocess
from pathlib import Path

import pytest

SETUP = Path(__file__).parent.parent / "scripts" / "setup.sh"


@pytest.mark.parametrize("args, env, message", [
    (["--gpu"], {}, "unknown option --gpu (use --cpu or --cuda)"),
    ([], {"NANOMOE_TORCH": "rocm"}, "NANOMOE_TORCH must be cpu or cuda, not 'rocm'"),
])
def test_setup_refuses_unknown_torch_builds(tmp_path, args, env, message):
    venv = tmp_path / "venv"
    proc = subprocess.run(["bash", str(SETUP), *args], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "NANOMOE_VENV": str(venv), **env})
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not venv.exists()  # refused before creating anything
