"""dermal-fn as a user installs it: the wheel, in a fresh environment, from a folder outside the checkout.

The wheel is built from this checkout (``pip wheel``, no network: the build tools are in the test
environment) and installed alone into a new virtual environment whose other packages are the test
environment's (no TensorFlow), through a ``.pth`` file. Every command then runs with the working
directory outside the checkout, so nothing is imported from it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.server import free_port
from tests.http_fixtures import REPO_ROOT, jpeg_bytes
from tests.waiting import wait_until

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Installed:
    """A fresh environment holding the built wheel: its python, its folder, a working folder outside the checkout."""

    python: Path
    root: Path
    work: Path

    def run(
        self, *argv: str, timeout_s: float = 120.0, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(a) for a in argv],
            cwd=self.work,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={**_clean_env(), **(env or {})},
        )


def _clean_env() -> dict[str, str]:
    """This process's environment without anything that would put the checkout on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MODEL_URI", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("package")
    source = root / "source"  # a copy without build leftovers: the wheel is what the project files say
    shutil.copytree(
        REPO_ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv*", "build", "*.egg-info", "__pycache__", "artifacts", "out"
        ),
    )
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(root / "dist"),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (root / "dist").glob("dermal_fn-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    # the dependencies: this test environment's packages (no TensorFlow), not the checkout
    (site / "test-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    work = root / "elsewhere"
    work.mkdir()
    return Installed(python=python, root=venv, work=work)


def test_the_wheel_holds_the_library_and_not_the_projects_own_files(installed: Installed) -> None:
    shown = installed.run(str(installed.python), "-m", "pip", "show", "-f", "dermal-fn")
    files = shown.stdout if shown.returncode == 0 else ""
    probe = installed.run(
        str(installed.python),
        "-c",
        "import json, dermal_fn, model_fetch, importlib.util as u; "
        "print(json.dumps({'file': dermal_fn.__file__, 'version': dermal_fn.__version__, "
        "'bench': u.find_spec('bench') is not None, 'tests': u.find_spec('tests') is not None}))",
    )
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    assert found["file"].startswith(str(installed.root)), found  # the installed copy, not the checkout
    assert found["bench"] is False and found["tests"] is False
    metadata = installed.run(
        str(installed.python),
        "-c",
        "import importlib.metadata as m; print('\\n'.join(m.requires('dermal-fn')))",
    ).stdout.splitlines()
    serving = [r for r in metadata if "extra ==" not in r]
    assert {r.split(">")[0].split("<")[0].split("=")[0].split(";")[0].strip() for r in serving} >= {
        "functions-framework",
        "ai-edge-litert",
        "numpy",
        "pillow",
        "psutil",
        "google-cloud-storage",
    }
    assert not any("tensorflow" in r for r in serving)  # only in the export extra
    assert any("tensorflow" in r and 'extra == "export"' in r for r in metadata)
    assert "dermal_fn/static/index.html" in files and "dermal_fn/models/synthetic_demo.dermal" in files


def test_the_command_is_python_m_dermal_fn(installed: Installed) -> None:
    script = installed.root / "bin" / "dermal-fn"
    version = installed.run(str(script), "--version")
    assert version.returncode == 0 and version.stdout.startswith("dermal-fn "), version.stderr
    as_module = installed.run(str(installed.python), "-m", "dermal_fn", "--version")
    assert as_module.stdout == version.stdout


def test_predict_from_python_answers_with_the_assessment(installed: Installed) -> None:
    (installed.work / "photo.jpg").write_bytes(jpeg_bytes(width=200, height=160, seed=3))
    done = installed.run(
        str(installed.python),
        "-c",
        "import json, sys, dermal_fn; body = dermal_fn.predict(open('photo.jpg', 'rb').read()); "
        "print(json.dumps({k: body[k] for k in ('model', 'assessment')})); "
        "print('tensorflow' in sys.modules)",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    answer, tensorflow = done.stdout.strip().splitlines()[-2:]
    body = json.loads(answer)
    assert body["assessment"]["distribution"]["status"] in ("in", "out")  # the calibrated demo
    assert body["model"]["backend"] == "litert"
    assert tensorflow == "False"


@pytest.fixture
def served(installed: Installed) -> Iterator[str]:
    port = free_port()
    log = (installed.work / "serve.log").open("w")
    process = subprocess.Popen(
        [str(installed.root / "bin" / "dermal-fn"), "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=installed.work,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_clean_env(),
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
        log.close()


def test_dermal_fn_serve_serves_the_demo_from_the_wheel(installed: Installed, served: str) -> None:
    import urllib.request

    def loaded() -> dict[str, object] | None:
        try:
            with urllib.request.urlopen(f"{served}/health", timeout=5) as response:
                body: dict[str, object] = json.loads(response.read())
        except OSError:
            return None
        return body if body.get("model_loaded") else None

    wait_until(
        loaded,
        timeout_s=90,
        what="the installed server to load the demo",
        describe=lambda: (installed.work / "serve.log").read_text()[-2000:],
    )
    request = urllib.request.Request(
        f"{served}/predict",
        data=jpeg_bytes(width=200, height=160, seed=4),
        headers={"Content-Type": "image/jpeg"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        body = json.loads(response.read())
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert body["gradcam"]["status"] == "ok" and "assessment" in body
    with urllib.request.urlopen(f"{served}/", timeout=5) as page:
        assert b"<html" in page.read()
    assert "serving on http://127.0.0.1:" in (installed.work / "serve.log").read_text()


def test_the_django_example_passes_its_tests_against_the_wheel(installed: Installed) -> None:
    example = installed.work / "django"
    shutil.copytree(REPO_ROOT / "examples" / "django", example)
    done = subprocess.run(
        [str(installed.python), "manage.py", "test", "-v", "2"],
        cwd=example,
        capture_output=True,
        text=True,
        timeout=300,
        env=_clean_env(),
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "Ran 4 tests" in done.stderr and "OK" in done.stderr
