"""The value types parameters and records are validated with, defined once for every layer.

Why here: the parameter models (``params``), the tiling and image checks (``images``) and the
run settings (``runtime``) all constrain their fields with these, and ``core`` is the one layer
they all sit on. Only pydantic annotations and ``Literal`` choices: no behaviour.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
#: [0, 1]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
#: [0, 1)
OpenFraction = Annotated[float, Field(ge=0.0, lt=1.0)]
#: (0, 1]
PositiveFraction = Annotated[float, Field(gt=0.0, le=1.0)]

#: How an image is decoded before tiling (``images.tiling``): at full resolution, or reduced to
#: no more pixels than the model sees.
DecodeMethod = Literal["full", "reduced"]
#: How training runs on the machine's devices (``runtime.distribution``).
Distribution = Literal["auto", "one_device", "mirrored", "multi_worker"]
#: Where an ImageScope region's class is read (``images.annotations``): its layer's ``Name`` or
#: its own ``Text``.
ImageScopeClass = Literal["annotation_name", "region_text"]
Precision = Literal["auto", "float32", "mixed_float16", "mixed_bfloat16"]
JitCompile = Literal["auto"] | bool
