"""The model families are listed once (models/families.py), and everything reads that table."""

from __future__ import annotations

import ast
import typing
from pathlib import Path

import pytest

from neuroblastoma_cnn.core.errors import ModelError
from neuroblastoma_cnn.models import families
from neuroblastoma_cnn.models.families import Capability

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "neuroblastoma_cnn"
TABLE = PACKAGE / "models" / "families.py"
NAMES = {f.name for f in families.FAMILIES}


def _listed_names(node: ast.AST) -> set[str]:
    """The family names a literal collection holds: a tuple, list or set of strings, a dict's
    keys, or the choices of ``Literal[...]``."""
    if isinstance(node, ast.Dict):
        items: list[ast.AST | None] = list(node.keys)
    elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        items = list(node.elts)
    else:
        return set()
    return {i.value for i in items if isinstance(i, ast.Constant) and i.value in NAMES}


def family_lists(path: Path) -> list[str]:
    """Every literal in ``path`` that lists two families or more: a second registry."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        listed = _listed_names(node)
        if len(listed) > 1:
            found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {sorted(listed)}")
    return found


def test_each_family_is_named_in_exactly_one_registry() -> None:
    found = [line for path in sorted(PACKAGE.rglob("*.py")) if path != TABLE
             for line in family_lists(path)]
    assert not found, ("model families listed outside models/families.py (read the table "
                       "instead):\n" + "\n".join(found))
    names = [f.name for f in families.FAMILIES]
    assert len(names) == len(set(names)), "a family is registered twice"


def test_the_check_sees_a_second_list() -> None:
    planted = ast.parse('MODELS = ("resnet34", "resnet50")\nX = Literal["floor", "resnet34"]\n'
                        'ONE = ("resnet34",)\n')
    assert sorted(len(_listed_names(n)) for n in ast.walk(planted) if _listed_names(n)) == [1, 2, 2]


def test_pipelines_datasets_and_parameters_read_the_table() -> None:
    from neuroblastoma_cnn import pipeline_registry  # noqa: PLC0415
    from neuroblastoma_cnn.params import ModelParams  # noqa: PLC0415
    from neuroblastoma_cnn.pipelines.features.params import ExtractorParams  # noqa: PLC0415

    trainable = families.trainable()
    assert trainable == ["resnet34", "resnet50"]
    assert list(pipeline_registry.MODELS) == trainable
    pipelines = pipeline_registry.register_pipelines()
    assert {f"train_{m}" for m in trainable} | {f"cross_validate_{m}" for m in trainable} <= set(
        pipelines)
    assert typing.get_args(ExtractorParams.model_fields["architecture"].annotation) == tuple(
        trainable)
    # One parameter model per trainable CNN (params/ sits below models/: it cannot read the
    # table, so this test holds the two together).
    members = typing.get_args(ModelParams.model_fields["root"].annotation)
    assert sorted(typing.get_args(m.model_fields["architecture"].annotation)[0]
                  for m in members) == sorted(families.names(Capability.TRAIN, kind="cnn"))


def test_unknown_names_give_one_line_listing_the_known_ones() -> None:
    with pytest.raises(ModelError) as caught:
        families.family("vgg16")
    line = caught.value.one_line()
    assert "\n" not in line and "'vgg16'" in line
    assert all(name in line for name in NAMES)
    assert families.family(" ResNet34 ").name == "resnet34"
    with pytest.raises(ModelError, match=r"Unknown architecture 'floor'.*resnet34, resnet50"):
        families.build_model("floor", 32, 2)


def test_the_capabilities_say_what_each_family_can_and_cannot_do() -> None:
    for name in families.names(kind="cnn"):
        assert families.family(name).can == frozenset(Capability)
    floor = families.family("floor")
    assert floor.can == {Capability.CROSS_VALIDATE, Capability.PREDICT, Capability.SERVE}
    with pytest.raises(ModelError, match=r"'floor'.*cannot gradcam: .*no convolutions"):
        floor.require(Capability.GRADCAM)
    assert not families.family("feature_heads").able(Capability.GRADCAM)
    assert families.names(Capability.SERVE) == ["resnet34", "resnet50", "floor", "selected_floor",
                                                "hybrid", "cv_ensemble"]
    # Every selection candidate can be served (the champion is what a user calls).
    assert set(families.names(Capability.CROSS_VALIDATE)) <= set(families.names(
        Capability.SERVE))
    assert all(f.cannot for f in families.FAMILIES if f.can != frozenset(Capability))


def test_every_builder_resolves_and_keras_layers_register() -> None:
    import keras  # noqa: PLC0415

    for f in families.FAMILIES:
        assert callable(f.load_builder()), f.name
    families.register_keras_layers()
    for layer in ("WeightedMean", "ImagenetPreprocess"):
        assert keras.saving.get_registered_object(f"neuroblastoma_cnn>{layer}") is not None
