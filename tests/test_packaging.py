"""The install layout: every package folder is installed, and `kernels/` never owns `import kernels`."""

import importlib
import importlib.util
import pathlib
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


def test_installing_sefe_fast_does_not_claim_the_top_level_kernels_name(tmp_path, monkeypatch):
    # Run from a directory that is not the repo root, as an installed user would: then
    # `import kernels` must resolve to Hugging Face's package (if installed) or to nothing,
    # never to our folder.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(ROOT))])
    spec = importlib.util.find_spec("kernels")
    if spec is not None:
        assert pathlib.Path(spec.origin).resolve().parent != ROOT / "kernels"
