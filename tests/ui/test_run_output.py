"""What a person reads while a pipeline runs: Kedro's progress and our own lines, nothing that
looks like a failure (telemetry attempts, third-party deprecation warnings, Keras progress bars),
except the few native lines TensorFlow prints while it is imported, which are accepted rather
than intercepted. And nothing that a crash writes is lost.
See src/neuroblastoma_cnn/runtime/quiet.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _tiny_project import TrainedProject, run_env

from neuroblastoma_cnn.hooks import project_sqlite_uri

# Nothing may match these in a run's output (stdout and stderr together).
FORBIDDEN = re.compile(
    r"WARNING|Traceback|Error|oneDNN|absl|cpu_feature_guard|^[IWEF]\d{4} |telemetry|Heap|"
    r"DeprecationWarning|UserWarning|━|\d+/\d+ \S+ \d+m?s/step",
    re.MULTILINE,
)
# Lines that match FORBIDDEN but are allowed, each with its reason.
ALLOWED: tuple[tuple[str, str], ...] = (
    (r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$",
     "TensorFlow 2.21's absl notice, printed while it is imported, before any log level applies"),
    (r"^I\d{4} [\d:. ]+\d+ port\.cc:\d+\] oneDNN custom operations are on",
     "TensorFlow's oneDNN start-up notice, same moment; hiding it would mean filtering fd 2"),
    (r"^E\d{4} [\d:. ]+\d+ node_def_util\.cc:\d+\] NodeDef mentions attribute "
     r"use_unbounded_threadpool which is not in the op definition",
     "TF's note on rewriting a parallel tf.data map when op determinism is on; Keras batches NumPy "
     "inputs that way when the logged model predicts its input example (ours, then MLflow's "
     "validation). TF ignores the attribute; hiding the line would mean filtering fd 2"),
    (r"WARNING  resnet\d+ did not learn: ",
     "true of the tiny runs (2 epochs on 56 small images): the run says so, as it must"),
    (r"WARNING  No prediction sets attached to the model: the validation split has \d+ images",
     "true of the tiny runs (4 validation images, fewer than evaluation.conformal.min_images): "
     "the run says why its answers carry no prediction sets, as it must"),
)
#: At most this many allowed native lines per process that imports TensorFlow (2 per library).
MAX_NATIVE_LINES = 4


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
    native = [line for line in output.splitlines()
              if any(re.search(p, line) for p, _ in ALLOWED[:2])]
    assert len(native) <= MAX_NATIVE_LINES, "\n".join(native)
    rewrites = [line for line in output.splitlines() if re.search(ALLOWED[2][0], line)]
    assert len(rewrites) <= 2, "\n".join(rewrites)  # the two predictions of the input example

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


@pytest.mark.integration
@pytest.mark.slow
def test_tensorflow_prints_only_its_accepted_start_up_lines():
    result = _python("""
        import neuroblastoma_cnn
        import tensorflow as tf
        print(tf.constant(2).numpy() * 21)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "42"
    lines = result.stderr.splitlines()
    assert len(lines) <= MAX_NATIVE_LINES, result.stderr
    for line in lines:
        assert any(re.search(p, line) for p, _ in ALLOWED), line


@pytest.mark.integration
@pytest.mark.slow
def test_a_native_crash_after_the_package_is_imported_reaches_stderr():
    """Nothing sits between file descriptor 2 and the terminal: a native abort's last words
    (written straight to fd 2, as C++ code does) and a child process's output arrive."""
    result = _python(r"""
        import os, subprocess, sys
        import neuroblastoma_cnn
        import tensorflow  # what used to run behind a file-descriptor filter
        subprocess.run([sys.executable, "-c",
                        "import os; os.write(2, b'child process says hello\\n')"], check=True)
        os.write(2, b"F0000 00:00:1.5   7 kernel.cc:9] Check failed: fatal native error\n")
        os.abort()
    """)
    assert result.returncode != 0
    assert "child process says hello" in result.stderr
    assert "Check failed: fatal native error" in result.stderr


def test_known_warnings_are_dropped_and_others_shown():
    result = _python("""
        import warnings
        import neuroblastoma_cnn
        warnings.warn("Add type hints to the `predict` method to enable data validation")
        warnings.warn("an unexpected warning", UserWarning)
    """)
    assert "Add type hints" not in result.stderr
    assert "an unexpected warning" in result.stderr


def test_relative_sqlite_store_is_anchored_at_the_project(tmp_path: Path):
    project = tmp_path / "project"
    assert project_sqlite_uri("sqlite:///mlflow.db", project) == (
        f"sqlite:///{(project / 'mlflow.db').resolve().as_posix()}")
    for uri in ("sqlite:////abs/mlflow.db", "sqlite:///:memory:", "http://host:5000",
                "databricks", None):
        assert project_sqlite_uri(uri, project) == uri
