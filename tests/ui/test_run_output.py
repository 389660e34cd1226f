"""What a person reads while a pipeline runs: Kedro's progress and our own lines, nothing that
looks like a failure (native TensorFlow notices, telemetry attempts, third-party deprecation
warnings, Keras progress bars). See src/neuroblastoma_cnn/quiet.py for what is hidden and why.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _tiny_project import TrainedProject, run_env, trained_project

from neuroblastoma_cnn.hooks import project_sqlite_uri
from neuroblastoma_cnn.quiet import is_native_noise

# Nothing may match these in a run's output (stdout and stderr together).
FORBIDDEN = re.compile(
    r"WARNING|Traceback|Error|oneDNN|absl|cpu_feature_guard|^[IWEF]\d{4} |telemetry|Heap|"
    r"DeprecationWarning|UserWarning|━|\d+/\d+ \S+ \d+m?s/step",
    re.MULTILINE,
)
# Lines that match FORBIDDEN but are allowed, each with its reason. None are needed today.
ALLOWED: tuple[tuple[str, str], ...] = ()


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainedProject:
    return trained_project(tmp_path_factory)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["train_resnet34", "resnet50"])
def test_a_pipeline_run_prints_only_what_a_person_needs(trained: TrainedProject, pipeline: str):
    result = trained.runs[pipeline]
    output = result.stdout + result.stderr
    bad = [
        line for line in output.splitlines()
        if FORBIDDEN.search(line) and not any(re.search(p, line) for p, _ in ALLOWED)
    ]
    assert not bad, "unexpected output lines:\n" + "\n".join(bad)

    model = pipeline.removeprefix("train_")
    epochs = ["train epoch 1/2", "train epoch 2/2"] if model == "resnet34" else [
        "head epoch 1/2", "head epoch 2/2", "fine_tune epoch 1/1"]
    expected = [
        f"Mlflow run '{pipeline}'",
        "Running node: train_model",
        *epochs,
        f"Completed node: {model}.compute_test_metrics",
        "Pipeline execution completed successfully",
    ]
    if pipeline == "train_resnet34":
        expected += ["Running node: build_image_manifest", "Tiled 56 images"]
    for text in expected:
        assert text in output, f"{text!r} missing from the run's output:\n{output[-3000:]}"


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=run_env(),
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow
def test_tensorflow_imports_silently_once_the_package_is_imported():
    result = _python("""
        import neuroblastoma_cnn
        import tensorflow as tf
        print(tf.constant(2).numpy() * 21)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "42"
    assert result.stderr == "", result.stderr


def test_native_lines_below_the_level_and_known_harmless_errors_are_noise():
    info = (b"I0000 00:00:1795630642.938969   13481 port.cc:153] oneDNN custom operations are "
            b"on. You may see slightly different numerical results")
    warning = b"W0000 00:00:1795630642.938969   13481 some_op.cc:12] something odd"
    harmless = (b"E0000 00:00:1795630665.638020   13481 node_def_util.cc:682] NodeDef mentions "
                b"attribute use_unbounded_threadpool which is not in the op definition: Op<...>")
    error = b"E0000 00:00:1795630665.638020   13481 kernel.cc:99] Out of memory"
    banner = b"WARNING: All log messages before absl::InitializeLog() is called are written to "
    for line in (info, warning, harmless, banner):
        assert is_native_noise(line, min_level=2), line
    for line in (error, b"Traceback (most recent call last):", b"ValueError: bad tile"):
        assert not is_native_noise(line, min_level=2), line
    # TF_CPP_MIN_LOG_LEVEL=0 shows every native line again (the known harmless error too).
    for line in (info, warning, harmless, banner):
        assert not is_native_noise(line, min_level=0), line


def test_filter_drops_native_noise_and_passes_everything_else(tmp_path: Path):
    """Writes straight to file descriptor 2, as TensorFlow's C++ code does."""
    result = _python(r"""
        import os, sys
        from neuroblastoma_cnn.quiet import native_stderr_filter
        with native_stderr_filter:
            os.write(2, b"I0000 00:00:1.5   7 port.cc:153] oneDNN custom operations are on\n")
            os.write(2, b"E0000 00:00:1.5   7 kernel.cc:9] a real native error\n")
            os.write(2, b"partial ")
            os.write(2, b"line kept\n")
            print("from python", file=sys.stderr)
            with native_stderr_filter:  # reentrant: nested use changes nothing
                os.write(2, b"W0000 00:00:1.5   7 x.cc:1] hidden warning\n")
        os.write(2, b"I0000 00:00:1.5   7 port.cc:153] after the filter: shown\n")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "E0000 00:00:1.5   7 kernel.cc:9] a real native error",
        "partial line kept",
        "from python",
        "I0000 00:00:1.5   7 port.cc:153] after the filter: shown",
    ]


def test_relative_sqlite_store_is_anchored_at_the_project(tmp_path: Path):
    project = tmp_path / "project"
    assert project_sqlite_uri("sqlite:///mlflow.db", project) == (
        f"sqlite:///{(project / 'mlflow.db').resolve().as_posix()}")
    for uri in ("sqlite:////abs/mlflow.db", "sqlite:///:memory:", "http://host:5000",
                "databricks", None):
        assert project_sqlite_uri(uri, project) == uri
