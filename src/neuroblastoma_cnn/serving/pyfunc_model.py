"""The script MLflow stores and runs to build the raw-image pyfunc model ("models from code").

Why a script and not the object: MLflow would otherwise cloudpickle a :class:`RawImageModel`
(a WARNING in every training run, and a pickle to trust on load); from code, the logged model
holds this file and the package's code, and builds the model from them.
"""

import mlflow

from neuroblastoma_cnn.serving.pyfunc import RawImageModel

mlflow.models.set_model(RawImageModel())
