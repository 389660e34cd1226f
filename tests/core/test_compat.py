"""Old module paths (before the move into sub-packages) still import, for one release, with a
DeprecationWarning naming the new path; they give the very same module, and old pickles load."""

from __future__ import annotations

import importlib
import importlib.util
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from neuroblastoma_cnn import _compat
from neuroblastoma_cnn.core.params import PredictParams
from neuroblastoma_cnn.images import decoding


def _fresh_import(old: str):
    """Imports ``old`` as if for the first time in this process, recording warnings."""
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    return module, [w for w in caught if issubclass(w.category, DeprecationWarning)]


@pytest.mark.parametrize("old", sorted(_compat.ALIASES))
def test_every_old_module_path_is_the_new_module_and_warns(old: str) -> None:
    new = _compat.ALIASES[old]
    module, caught = _fresh_import(old)
    assert module is importlib.import_module(new)
    assert module.__name__ == new and module.__spec__.name == new  # not renamed by the alias
    assert len(caught) == 1 and new in str(caught[0].message) and old in str(caught[0].message)


def test_every_new_module_exists_and_no_old_module_file_is_left() -> None:
    root = {path.name for path in Path(decoding.__file__).parents[1].iterdir()}
    for old, new in _compat.ALIASES.items():
        assert importlib.util.find_spec(new) is not None, new
        assert old.rpartition(".")[2] + ".py" not in root, f"{old} is both a file and an alias"


def test_from_old_module_import_name() -> None:
    sys.modules.pop("neuroblastoma_cnn.params", None)
    with pytest.warns(DeprecationWarning, match=r"neuroblastoma_cnn\.core\.params"):
        from neuroblastoma_cnn.params import PredictParams as Old  # noqa: PLC0415
    assert Old is PredictParams


def test_old_path_in_a_new_process_warns_at_the_importing_line(tmp_path) -> None:
    """What a user's script sees: the warning points at their import, once."""
    script = tmp_path / "old_user.py"
    script.write_text("import warnings\nwarnings.simplefilter('always')\n"
                      "import neuroblastoma_cnn.imaging\n"
                      "from neuroblastoma_cnn.stain import fit_stain_reference\n"
                      "from neuroblastoma_cnn import imaging\n"
                      "print(neuroblastoma_cnn.imaging.__name__, fit_stain_reference.__module__)\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            check=True, timeout=300)
    assert result.stdout.split() == ["neuroblastoma_cnn.images.decoding",
                                     "neuroblastoma_cnn.images.stain"]
    lines = [line for line in result.stderr.splitlines() if "DeprecationWarning" in line]
    assert len(lines) == 2, result.stderr
    assert f"{script}:3:" in lines[0] and "import neuroblastoma_cnn.images.decoding" in lines[0]
    assert f"{script}:4:" in lines[1] and "import neuroblastoma_cnn.images.stain" in lines[1]


def test_a_pickle_naming_the_old_module_loads() -> None:
    """Pickles (and cloudpickled MLflow models) name classes by module: old ones still load,
    whether they name ``imaging`` or ``images.decoding`` (these classes' home before they moved
    to ``images.tiling`` and ``images.rejection``; ``decoding`` re-exports them)."""
    new_class = pickle.dumps(decoding.TilingConfig, protocol=0)
    new_instance = pickle.dumps(decoding.ImageRejected("a.png", decoding.Reason.CORRUPT),
                                protocol=0)
    class_module = decoding.TilingConfig.__module__.encode()
    instance_module = decoding.ImageRejected.__module__.encode()
    assert class_module in new_class and instance_module in new_instance
    for old in (b"neuroblastoma_cnn.imaging", b"neuroblastoma_cnn.images.decoding"):
        old_class = new_class.replace(class_module, old)
        old_instance = new_instance.replace(instance_module, old)
        sys.modules.pop("neuroblastoma_cnn.imaging", None)
        if old.endswith(b"imaging"):
            with pytest.warns(DeprecationWarning):
                assert pickle.loads(old_class) is decoding.TilingConfig
        else:
            assert pickle.loads(old_class) is decoding.TilingConfig
        loaded = pickle.loads(old_instance)
        assert type(loaded) is decoding.ImageRejected
        assert (loaded.path, loaded.reason) == ("a.png", decoding.Reason.CORRUPT)


def test_cli_entry_points_stay_and_other_old_names_warn() -> None:
    import neuroblastoma_cnn.cli as cli_package  # noqa: PLC0415
    from neuroblastoma_cnn.cli import commands  # noqa: PLC0415

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cli_package.main is commands.main and cli_package.cli is commands.cli
    with pytest.warns(DeprecationWarning, match=r"neuroblastoma_cnn\.cli\.commands\.MODELS_DIR"):
        assert cli_package.MODELS_DIR == commands.MODELS_DIR
    with pytest.raises(AttributeError):
        _ = cli_package.no_such_name


def test_the_finder_is_installed_once() -> None:
    _compat.install()
    _compat.install()
    assert sum(isinstance(f, _compat.AliasFinder) for f in sys.meta_path) == 1
