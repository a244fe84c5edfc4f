"""The install layout: every package folder is installed, and `kernels/` never owns `import kernels`."""

import importlib
import os
import pathlib
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _listed_packages() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return set(config["tool"]["setuptools"]["packages"])


def test_every_package_folder_is_listed_in_pyproject():
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "sefe_fast").rglob("__init__.py")
    }
    on_disk.add("sefe_fast_kernels")
    assert on_disk == _listed_packages()


def test_kernels_folder_is_installed_under_its_own_name():
    module = importlib.import_module("sefe_fast_kernels")
    assert pathlib.Path(module.__file__).resolve().parent == ROOT / "kernels"


def test_installing_sefe_fast_does_not_claim_the_top_level_kernels_name(tmp_path):
    # A fresh interpreter outside the repo, as an installed user runs it: `kernels` must
    # resolve to Hugging Face's package (if installed) or to nothing, never to our folder,
    # while `sefe_fast_kernels` is ours.
    probe = (
        "import importlib.util as u; k = u.find_spec('kernels'); "
        "s = u.find_spec('sefe_fast_kernels'); "
        "print(k.origin if k else ''); print(s.origin)"
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    kernels_origin, ours_origin = out.stdout.splitlines()
    assert pathlib.Path(ours_origin).resolve().parent == ROOT / "kernels"
    if kernels_origin:
        assert pathlib.Path(kernels_origin).resolve().parent != ROOT / "kernels"
