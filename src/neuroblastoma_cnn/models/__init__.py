"""The model families the project builds: ``families`` lists them (what each can do, where its
builder is) and builds the CNNs (``families.build_model``); one module per family
(``resnet34``, ``resnet50``, ``classical``: the floor, ``feature_heads``, ``ensemble``) and the
ResNets' shared classifier head (``head``).

Importing this package imports nothing else, so the table can be read without TensorFlow; a
family's module is imported when one of its models is built or loaded
(``families.register_keras_layers`` before loading a saved Keras model).
"""
