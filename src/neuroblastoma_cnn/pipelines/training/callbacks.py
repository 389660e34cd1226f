"""The training callback: validation metrics from one prediction pass per epoch.

Imported only when a model trains (it needs Keras, hence TensorFlow), so that registering the
pipelines stays fast.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from sklearn.metrics import f1_score

logger = logging.getLogger("neuroblastoma_cnn.pipelines.training.nodes")


class ValidationReport(keras.callbacks.Callback):
    """Validation loss, accuracy, macro-F1 and the number of classes predicted, from one predict
    pass per epoch over *all* validation tiles (Keras' own validation would predict the
    validation set a second time); appends one history row per epoch and logs one line.

    With ``val_images`` (the image of each validation tile) it also gives
    ``val_image_macro_f1``: macro-F1 of the images, each predicted by the mean of its tiles'
    probabilities, as the test is scored. With ``window`` > 1 it adds ``monitor_smoothed``, the
    mean of ``monitor`` over the last ``window`` epochs, for choosing the epoch on a steadier
    signal than one noisy validation pass.

    It must come before ``EarlyStopping`` in the callback list: it puts the values EarlyStopping
    monitors into the epoch's logs.
    """

    def __init__(self, val_inputs: Any, val_labels: np.ndarray, num_classes: int, stage: str,
                 total_epochs: int, history: list[dict[str, Any]], *,
                 val_images: np.ndarray | None = None, monitor: str = "val_macro_f1",
                 window: int = 1):
        super().__init__()
        if isinstance(val_inputs, np.ndarray):
            # Keras' own batching of arrays uses a parallel tf.data map, which TF rewrites (and
            # reports on stderr) when op determinism is on; one sequential dataset predicts the
            # same batches of 32 without it.
            val_inputs = tf.data.Dataset.from_tensor_slices(val_inputs).batch(32)
        self.val_inputs, self.val_labels = val_inputs, np.asarray(val_labels)
        self.num_classes, self.stage, self.total_epochs = num_classes, stage, total_epochs
        self.history = history
        self.started = 0.0
        self.val_images = None if val_images is None else np.asarray(val_images)
        self.monitor, self.window = monitor, max(1, int(window))
        self.monitored: list[float] = []

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs if logs is not None else {}
        prob = np.asarray(self.model.predict(self.val_inputs, verbose=0), dtype=np.float64)
        labels = self.val_labels
        pred = prob.argmax(axis=1)
        picked = np.clip(prob[np.arange(len(labels)), labels], 1e-7, 1.0)
        logs["val_loss"] = float(-np.log(picked).mean())
        logs["val_accuracy"] = float((pred == labels).mean())
        logs["val_macro_f1"] = float(f1_score(labels, pred, average="macro",
                                              labels=range(self.num_classes), zero_division=0))
        if self.val_images is not None:
            logs["val_image_macro_f1"] = self._image_macro_f1(prob)
        self.monitored.append(float(logs[self.monitor]))
        if self.window > 1:
            logs["monitor_smoothed"] = float(np.mean(self.monitored[-self.window:]))
        seconds = time.perf_counter() - self.started
        row = {
            "epoch": len(self.history) + 1,
            "stage": self.stage,
            "loss": float(logs.get("loss", np.nan)),
            "accuracy": float(logs.get("accuracy", np.nan)),
            "val_loss": logs["val_loss"],
            "val_accuracy": logs["val_accuracy"],
            "val_macro_f1": logs["val_macro_f1"],
            "val_image_macro_f1": logs.get("val_image_macro_f1", np.nan),
            "monitor_smoothed": logs.get("monitor_smoothed", np.nan),
            "val_predicted_classes": len(np.unique(pred)),
            "learning_rate": float(np.asarray(self.model.optimizer.learning_rate)),
            "seconds": seconds,
        }
        self.history.append(row)
        logger.info(
            "%s epoch %d/%d  loss %.4f  acc %.3f  val_loss %.4f  val_acc %.3f  val_macro_f1 %.3f"
            "%s  %.1fs", self.stage, epoch + 1, self.total_epochs, row["loss"], row["accuracy"],
            row["val_loss"], row["val_accuracy"], row["val_macro_f1"],
            "" if self.val_images is None else f"  images {row['val_image_macro_f1']:.3f}",
            seconds,
        )

    def _image_macro_f1(self, prob: np.ndarray) -> float:
        """Macro-F1 of the images, each the mean of its tiles' probabilities."""
        images, index = np.unique(self.val_images, return_inverse=True)
        sums = np.zeros((len(images), prob.shape[1]))
        np.add.at(sums, index, prob)
        truth = np.zeros(len(images), dtype=int)
        truth[index] = self.val_labels
        return float(f1_score(truth, sums.argmax(axis=1), average="macro",
                              labels=range(self.num_classes), zero_division=0))


class AveragedWeights(keras.callbacks.SwapEMAWeights):
    """At each epoch end, swaps the optimizer's moving average of the weights (``use_ema``)
    into the model, so that the validation pass and the best-epoch snapshot after this
    callback see the averaged weights; :attr:`swap_back`, placed after them (and before the
    epoch's backup), swaps the trained weights back, so that training and a resumed run go on
    from them. Keras' own ``swap_on_epoch`` swaps back only when the next epoch begins, after
    the backup, which would resume from the average.

    It must come first in the callback list. The average covers the trainable weights;
    BatchNorm's moving statistics stay those of the trained weights.
    """

    def __init__(self) -> None:
        super().__init__(swap_on_epoch=False)
        self.swap_back = _SwapBack(self)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._swap_variables()

    def _swap_variables(self) -> None:
        """Swaps through a copy: Keras' TensorFlow swap (a+b, then subtractions) rounds, so
        the weights training goes on from would drift from the raw ones at every epoch."""
        self._apply_to_ema_optimizers(self._backend_swap_variables,
                                      self._backend_swap_variables)


class _SwapBack(keras.callbacks.Callback):
    def __init__(self, averaged: AveragedWeights) -> None:
        super().__init__()
        self.averaged = averaged

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.averaged._swap_variables()  # the owner's exact swap, back
