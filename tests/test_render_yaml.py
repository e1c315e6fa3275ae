"""render.yaml is a valid Render Blueprint and starts the function exactly as the tests, the Makefile and the docs do."""

from __future__ import annotations

import platform
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.server import START_COMMAND
from dermal_fn.serving.config import Settings
from tests.http_fixtures import REPO_ROOT, start_argv

CONTRACT_VARIABLES = (
    "MODEL_URI",
    "MODEL_SHA256",
    "MODEL_CACHE_DIR",
    "ENABLE_GRADCAM",
    "MEMORY_SOFT_LIMIT_MB",
    "MAX_UPLOAD_MB",
    "API_KEY",
)
SECRETS = ("MODEL_URI", "MODEL_SHA256", "API_KEY", "GOOGLE_APPLICATION_CREDENTIALS")


@pytest.fixture(scope="module")
def service() -> dict[str, Any]:
    blueprint = yaml.safe_load((REPO_ROOT / "render.yaml").read_text())
    assert set(blueprint) == {"services"}
    (only,) = blueprint["services"]
    assert isinstance(only, dict)
    return only


@pytest.fixture(scope="module")
def env_vars(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    entries = service["envVars"]
    keys = [entry["key"] for entry in entries]
    assert len(keys) == len(set(keys)), "duplicate envVars keys"
    return {entry["key"]: entry for entry in entries}


def normalise(command: str) -> str:
    """One spacing, and any --port value written as $PORT."""
    command = " ".join(command.split())
    return re.sub(r"--port[= ](\$\(PORT\)|\$\{PORT\}|\$PORT|\d+)", "--port=$PORT", command)


def test_web_service_on_the_free_plan(service: dict[str, Any]) -> None:
    assert service["type"] == "web"
    assert service["runtime"] == "python"
    assert service["plan"] == "free"
    assert service["buildCommand"] == (
        "pip install --require-hashes -r requirements.lock && python -m dermal_fn.serving.warm"
    )
    assert service["healthCheckPath"] == "/health"
    assert (REPO_ROOT / "requirements.txt").is_file()


def test_start_command_is_the_one_the_tests_use(service: dict[str, Any]) -> None:
    assert service["startCommand"] == START_COMMAND
    argv = start_argv(8080)
    assert argv[: len(START_COMMAND.split())] == START_COMMAND.replace("$PORT", "8080").split()
    assert "--target=dermal" in argv
    assert "--source=main.py" in argv


def test_makefile_serve_runs_the_same_command() -> None:
    makefile = (REPO_ROOT / "Makefile").read_text()
    match = re.search(r"^serve:.*\n((?:\t.*\n)+)", makefile, flags=re.MULTILINE)
    assert match is not None, "expected a serve target in the Makefile"
    recipe = [normalise(line) for line in match.group(1).splitlines() if "functions-framework" in line]
    assert len(recipe) == 1
    assert recipe[0].endswith(START_COMMAND)


@pytest.mark.parametrize("document", ["README.md", "docs/deploy.md"])
def test_documents_show_the_same_command(document: str) -> None:
    path = REPO_ROOT / document
    lines = [
        normalise(line)
        for line in path.read_text().splitlines()
        if re.search(r"functions-framework\s+--target", line)
    ]
    assert lines, f"expected {document} to show the start command"
    for line in lines:
        assert START_COMMAND in line, f"{document}: {line!r} is not {START_COMMAND!r}"


def test_python_version_is_the_one_the_tests_run_on(env_vars: dict[str, dict[str, Any]]) -> None:
    pinned = env_vars["PYTHON_VERSION"]["value"]
    assert pinned == platform.python_version()
    assert (REPO_ROOT / ".python-version").read_text().strip() == pinned


def test_cloud_functions_runtime_matches(env_vars: dict[str, dict[str, Any]]) -> None:
    major, minor, _ = env_vars["PYTHON_VERSION"]["value"].split(".")
    deploy = (REPO_ROOT / "docs/deploy.md").read_text()
    assert f"--runtime=python{major}{minor}" in deploy
    for flag in ("--entry-point=dermal", "--memory=512Mi", "--gen2", "--trigger-http", "--source=."):
        assert flag in deploy
    assert "gcloud storage cp model.dermal gs://" in deploy


def test_env_vars_are_well_formed(env_vars: dict[str, dict[str, Any]]) -> None:
    for key, entry in env_vars.items():
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", key)
        if "value" in entry:
            assert isinstance(entry["value"], str), f"{key}: quote the value, Render wants a string"
            assert set(entry) == {"key", "value"}
        else:
            assert entry == {"key": key, "sync": False}


def test_contract_variables_are_listed(env_vars: dict[str, dict[str, Any]]) -> None:
    assert set(CONTRACT_VARIABLES) <= set(env_vars)
    assert "STORAGE_EMULATOR_HOST" not in env_vars  # tests only


def test_secrets_and_the_model_are_not_committed(env_vars: dict[str, dict[str, Any]]) -> None:
    for key in SECRETS:
        assert env_vars[key] == {"key": key, "sync": False}
    assert not re.search(r"value:\s*[\"']?gs://", (REPO_ROOT / "render.yaml").read_text())


def test_values_are_a_valid_configuration_with_the_defaults(env_vars: dict[str, dict[str, Any]]) -> None:
    values = {key: entry["value"] for key, entry in env_vars.items() if "value" in entry}
    settings = Settings.from_env(values)
    assert settings.enable_gradcam is True
    assert settings.max_upload_mb == Settings().max_upload_mb
    assert settings.memory_limit_mb == 512.0
    assert settings.memory_soft_limit_mb is not None
    assert settings.memory_soft_limit_mb == pytest.approx(0.9 * 512.0, abs=1.0)
    assert int(values["WORKERS"]) == 1  # one model per instance


def test_demo_default_when_model_uri_is_left_empty() -> None:
    assert Settings.from_env({"MODEL_URI": ""}).model_uri.endswith("synthetic_demo.dermal")
    assert Path(Settings().model_uri).parent.name == "models"


@pytest.mark.parametrize(
    "name", ["requirements", "requirements-test", "requirements-dev", "requirements-tfkeras"]
)
def test_each_lock_file_pins_what_its_requirements_file_asks_for(name: str) -> None:
    """`make lock` output agrees with the .txt files, and every locked line carries hashes."""

    def pins(path: Path) -> dict[str, str]:
        found: dict[str, str] = {}
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("-r "):
                found.update(pins(path.parent / line[3:].strip()))
            elif "==" in line:
                package, _, version = line.partition("==")
                found[package.strip().lower().replace("_", "-").replace(".", "-")] = version.split()[0].strip(
                    " \\"
                )
        return found

    wanted = pins(REPO_ROOT / f"{name}.txt")
    lock_text = (REPO_ROOT / f"{name}.lock").read_text()
    locked = pins(REPO_ROOT / f"{name}.lock")
    assert {package: locked.get(package) for package in wanted} == wanted, "run `make lock`"
    entries = [chunk for chunk in lock_text.split("\n") if "==" in chunk and not chunk.startswith(" ")]
    assert entries and all(entry.rstrip().endswith("\\") for entry in entries)  # each has --hash lines


def test_the_build_warms_a_cache_that_is_deployed(env_vars: dict[str, dict[str, Any]]) -> None:
    """The warm step's cache must be inside the project folder: Render deploys that folder, not /tmp."""
    cache = Path(env_vars["MODEL_CACHE_DIR"]["value"])
    assert not cache.is_absolute() and ".." not in cache.parts
    assert f"/{cache.parts[0]}/" in (REPO_ROOT / ".gitignore").read_text().splitlines()  # never committed
