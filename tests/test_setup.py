"""setup.sh's choice of torch build, against fake `nvidia-smi`s (dry run: nothing is installed)."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def choice(tmp_path, smi: str | None, **env) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "nvidia-smi"
    if smi is None:
        fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed: no driver' >&2\nexit 9\n")
    else:
        fake.write_text(
            '#!/bin/sh\nif [ "$1" = "-L" ]; then echo "GPU 0: NVIDIA H200 (UUID: GPU-0)"; exit 0; fi\n'
            f'echo "| NVIDIA-SMI 580.95.05   Driver Version: 580.95.05   CUDA Version: {smi}     |"\n'
        )
    fake.chmod(0o755)
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run(
        ["bash", str(ROOT / "setup.sh")],
        env={**os.environ, "PATH": path, "FEDPRIV_SETUP_DRY_RUN": "1", "FEDPRIV_TORCH_VERSION": "2.13.0", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("driver", "build"),
    [(None, "cpu"), ("12.4", "cpu"), ("12.6", "cu126"), ("12.9", "cu128"), ("13.0", "cu130"), ("13.2", "cu130")],
)
def test_setup_picks_the_newest_cuda_build_the_driver_supports(tmp_path, driver, build):
    result = choice(tmp_path, driver)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"torch==2.13.0 {build}"
    if driver == "12.4":  # a GPU it cannot use is said, not silently ignored
        assert "supports CUDA 12.4, older than PyTorch's builds (12.6+)" in result.stderr


def test_the_build_can_be_chosen_by_hand(tmp_path):
    assert choice(tmp_path, "13.0", FEDPRIV_TORCH_CUDA="cu126").stdout.strip() == "torch==2.13.0 cu126"
    assert choice(tmp_path, "13.0", FEDPRIV_TORCH_CUDA="cpu").stdout.strip() == "torch==2.13.0 cpu"
