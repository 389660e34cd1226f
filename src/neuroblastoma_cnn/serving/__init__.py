"""From image files to answers, with a trained model and its record: what the predict pipeline,
the ``neuroblastoma-cnn`` command and the MLflow raw-image model (``mlflow models serve``) share.

``images`` lists, checks, decodes and tiles a file as in training; ``slide_tiles`` plans a
whole slide and reads its tissue tiles a chunk at a time; ``tiles`` batches every file's tiles
through the model (``predict_files``); ``pyfunc`` is the served model (``RawImageModel``) and
logs it (``log_raw_image_model``), built by MLflow from ``pyfunc_model.py`` ("models from code").
"""
