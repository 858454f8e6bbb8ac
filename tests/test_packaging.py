"""One import namespace, `privseg`: nothing named datasets/benchmark/architectures top-level."""

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_subpackages_resolve_to_this_repo_from_outside(tmp_path):
    code = (
        "import importlib.util, privseg.datasets, privseg.architectures, privseg.results, "
        "privseg.sweeps, privseg;"
        "print(privseg.datasets.__file__);"
        "spec = importlib.util.find_spec('datasets');"
        "print(spec.origin if spec else 'none');"
        "print(importlib.util.find_spec('benchmark'), importlib.util.find_spec('architectures'))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert Path(out[0]).resolve().is_relative_to(REPO / "datasets")
    assert out[1] == "none" or not Path(out[1]).resolve().is_relative_to(REPO)
    assert out[2] == "None None"


def test_wheel_installs_only_the_privseg_namespace(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(REPO)], check=True, capture_output=True,
                   timeout=300)
    wheel = next(tmp_path.glob("privseg-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"privseg", next(t for t in tops if t.endswith(".dist-info"))}
    assert "privseg/datasets/phantom.py" in names
    assert "privseg/architectures/unet.py" in names
    assert "privseg/configs/phantom2d.yaml" in names
