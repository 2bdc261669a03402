"""A non-editable wheel install migrates and reads its JSON Schemas: schemas/ ships as ingest.schemas (issue #9).

The wheel is built offline, with this venv's setuptools, from a copy of the sources, so build/ and *.egg-info
land in the copy, never in the repo. It is installed with --no-deps into a fresh venv and run with its working
directory outside the repo. The dependencies come from this venv's site-packages through a plain path line in
a .pth file: such a line adds the directory without running the .pth files in it, so this venv's editable
finder for `ingest` is never installed there and `ingest` can only come from the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from tests.services import REPO

# What the wheel is built from: pyproject.toml names README.md as the long description.
SOURCES = ("pyproject.toml", "README.md", "ingest", "schemas")


@dataclass(frozen=True)
class Installed:
    src: Path  # the copy the wheel was built from: what it must hold, however the repo changes meanwhile
    wheel: Path
    python: Path
    script: Path
    site_packages: Path
    cwd: Path


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _clean_env(**extra: str) -> dict[str, str]:
    # Nothing may point the new venv back at the repo or at this venv's editable install.
    drop = ("PYTHON", "SENSOR_INGEST_", "VIRTUAL_ENV")
    return {**{k: v for k, v in os.environ.items() if not k.startswith(drop)}, **extra}


def copy_sources(root: Path, dest: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        if (root / name).is_dir():
            shutil.copytree(root / name, dest / name, ignore=ignore)
        else:
            shutil.copy2(root / name, dest / name)
    return dest


def build_and_install(src: Path, work: Path) -> Installed:
    dist = work / "dist"
    # --check-build-dependencies: without build isolation, an old setuptools in this venv is named as the cause.
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--check-build-dependencies",
          "--no-index", "--wheel-dir", str(dist), str(src)], cwd=work)
    (wheel,) = dist.glob("sensor_ingest-*.whl")

    env_dir = work / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], cwd=work)
    python = env_dir / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
         cwd=work)
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     cwd=work, env=_clean_env()).stdout.strip())
    deps = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (site / "zz_sensor_ingest_test_deps.pth").write_text("".join(f"{d}\n" for d in deps), encoding="utf-8")
    cwd = work / "elsewhere"
    cwd.mkdir()
    return Installed(src, wheel, python, env_dir / "bin" / "sensor-ingest", site, cwd)


def _migration_files(installed: Installed) -> list[str]:
    return sorted(p.name for p in (installed.src / "schemas" / "migrations").glob("*.sql"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    return build_and_install(copy_sources(REPO, src), work)


def test_wheel_holds_the_package_and_the_schemas(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as whl:
        names = set(whl.namelist())
    # pyproject.toml lists the packages by hand (packages.find cannot see the mapped schemas/), so a new
    # module folder left out of that list shows up here.
    package = installed.src / "ingest"
    expected = {f"ingest/{p.relative_to(package)}" for p in package.rglob("*") if p.is_file()}
    expected |= {f"ingest/schemas/migrations/{name}" for name in _migration_files(installed)}
    expected |= {"ingest/schemas/__init__.py", "ingest/schemas/json/native.schema.json"}
    assert sorted(expected - names) == []


def test_installed_wheel_imports_and_reads_its_own_schemas(installed: Installed) -> None:
    # Every module is imported (the service's too, not only migrate's); __main__ would run the CLI.
    probe = (
        "import importlib, importlib.resources, json, pkgutil, sys, ingest\n"
        "mods = [i.name for i in pkgutil.walk_packages(ingest.__path__, 'ingest.') if i.name != 'ingest.__main__']\n"
        "for name in mods: importlib.import_module(name)\n"
        "import ingest.schemas, ingest.store.migrate as m, ingest.wire as w\n"
        "print(json.dumps({'ingest': ingest.__file__, 'schemas': ingest.schemas.__file__,\n"
        "  'modules': sorted({sys.modules[n].__file__ for n in mods}),\n"
        "  'migrations': str(m.MIGRATIONS_DIR), 'json': str(w.SCHEMA_DIR),\n"
        "  'found': [f'{x.version:04d}_{x.name}.sql' for x in m.discover()],\n"
        "  'editable': [k for k in sys.modules if k.startswith('__editable__')],\n"
        "  'schema': importlib.resources.files('ingest.schemas').joinpath('json', 'native.schema.json')\n"
        "    .read_text(encoding='utf-8')}))\n"
    )
    out = json.loads(_run([str(installed.python), "-c", probe], cwd=installed.cwd, env=_clean_env()).stdout)
    site = str(installed.site_packages) + os.sep
    for key in ("ingest", "schemas", "migrations", "json"):
        assert out[key].startswith(site), (key, out[key])
    assert "ingest.service" in {m.removeprefix(site).removesuffix(".py").replace(os.sep, ".") for m in out["modules"]}
    assert [m for m in out["modules"] if not m.startswith(site)] == []
    assert out["editable"] == []
    assert out["found"] == _migration_files(installed)
    assert out["schema"] == (installed.src / "schemas" / "json" / "native.schema.json").read_text(encoding="utf-8")


def test_installed_wheel_migrates_an_empty_database(installed: Installed, empty_database_url: str) -> None:
    files = _migration_files(installed)
    env = _clean_env(SENSOR_INGEST_DATABASE_URL=empty_database_url)
    first = _run([str(installed.script), "migrate"], cwd=installed.cwd, env=env)
    assert f"applied {len(files)} migration(s)" in first.stdout
    again = _run([str(installed.script), "migrate"], cwd=installed.cwd, env=env)
    assert "is up to date" in again.stdout
    with psycopg.connect(empty_database_url) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY 1").fetchall()]
        hypertables = {r[0] for r in conn.execute("SELECT hypertable_name FROM timescaledb_information.hypertables")}
    assert versions == [int(name[:4]) for name in files]
    assert {"readings", "states", "rejected_messages"} <= hypertables
