"""A non-editable install ships everything a command needs (issue 10 item 6).

Builds a wheel from the source tree, installs it into a fresh venv that sees the packages of the
interpreter running the tests (torch etc.; ``--no-deps --no-index``, so no network) and, from a
folder outside the repository,
checks that the installed fastpc is the wheel's, that it has the source tree's presets and the
PCX worker, and that ``fastpc train`` finds the presets by name.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from fastpc.presets import list_presets

ROOT = Path(__file__).resolve().parent.parent

# Runs inside the venv: what the installed package holds.
PROBE = """
import json, fastpc, fastpc.presets, fastpc.bench.speed as speed
from fastpc.config import load_config
from pathlib import Path
pkg = Path(fastpc.__file__).resolve().parent
for name in fastpc.presets.list_presets():
    load_config(fastpc.presets.preset_path(name))
print(json.dumps({
    "file": str(Path(fastpc.__file__).resolve()),
    "presets": fastpc.presets.list_presets(),
    "pcx_script": str(speed.PCX_SCRIPT),
    "pcx_script_is_file": speed.PCX_SCRIPT.is_file(),
    "files": sorted(str(p.relative_to(pkg)) for p in pkg.rglob("*") if p.is_file() and p.suffix != ".pyc"),
}))
"""


def _run(cmd, cwd, env, check=True):
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check and res.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


def _running_site_dirs() -> list[str]:
    """The site-packages folders of the interpreter running the tests, in its order.

    In a venv, ``--system-site-packages`` would give the base interpreter's folders instead, which
    need not hold torch; a conda-like env or the system interpreter has its own folders here too.
    """
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    dirs += [sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir()]


def _source_files() -> set[str]:
    """Files of the package in the source tree (what an editable install sees)."""
    pkg = ROOT / "fastpc"
    return {str(p.relative_to(pkg)) for p in pkg.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, a folder outside the repo, environment) with fastpc installed from a wheel."""
    tmp = tmp_path_factory.mktemp("packaging")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"

    # Build from a copy of the source, so a stale build/ in the checkout cannot leak into the wheel
    # and concurrent builds do not share one.
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "setup.py", "setup.cfg", "MANIFEST.in", "LICENSE"):
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "fastpc", src / "fastpc", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels = tmp / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels, "."],
         src, env)
    (wheel,) = wheels.glob("fastpc-*.whl")

    env_dir = tmp / "venv"
    venv.EnvBuilder(system_site_packages=False, with_pip=False).create(env_dir)
    py = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    # The running interpreter's folders after the venv's own (a .pth line appends to sys.path), so
    # the wheel's fastpc comes first; their own .pth files (an editable fastpc) are not processed.
    nested_site = _run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp, env)
    Path(nested_site.stdout.strip(), "fastpc-test-parent.pth").write_text("\n".join(_running_site_dirs()) + "\n")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "--force-reinstall",
          "-q", wheel], tmp, env)

    work = tmp / "elsewhere"  # not the repository: `python -m` puts the cwd first on sys.path
    work.mkdir()
    return py, work, env


def test_wheel_ships_presets_and_pcx_worker(installed):
    py, work, env = installed
    info = json.loads(_run([py, "-c", PROBE], work, env).stdout.strip().splitlines()[-1])
    venv_dir = py.parent.parent.resolve()
    assert Path(info["file"]).is_relative_to(venv_dir), f"imported {info['file']}, not the wheel's fastpc"

    source_presets = sorted(p.stem for p in (ROOT / "fastpc" / "presets").glob("*.yaml"))
    assert "quickstart" in source_presets and "fmnist-mlp-epc-quick" in source_presets
    assert list_presets() == source_presets  # the editable install
    assert info["presets"] == source_presets  # the wheel

    assert info["pcx_script_is_file"] and Path(info["pcx_script"]).name == "pcx_speed.py"
    assert Path(info["pcx_script"]).resolve().is_relative_to(venv_dir)
    missing = _source_files() - set(info["files"])
    assert not missing, f"files of the source package missing from the wheel: {sorted(missing)}"


def test_installed_cli_finds_presets_by_name(installed):
    py, work, env = installed
    presets = list_presets()
    scripts = py.parent
    wide = {**env, "COLUMNS": "2000"}  # argparse wraps help (at hyphens too) to the terminal width
    for cmd in ([py, "-m", "fastpc", "train", "--help"], [scripts / "fastpc", "train", "--help"]):
        out = _run(cmd, work, wide).stdout
        (line,) = [ln for ln in out.splitlines() if "presets: " in ln]
        assert line.split("presets: ", 1)[1].strip().split(", ") == presets, out
    bad = _run([py, "-m", "fastpc", "train", "no-such-preset"], work, env, check=False)
    assert bad.returncode == 2
    assert "presets: " in bad.stderr and "presets: none" not in bad.stderr
    assert "fmnist-mlp-epc-quick" in bad.stderr
