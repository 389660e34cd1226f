"""From an image file to the tensors a model sees: decoding, image checks, the tissue rule and
tiling (``decoding``), whole-slide images (``slides``), stain normalisation (``stain``),
on-the-fly augmentation and test-time augmentation (``online_augmentation``), class-balanced
sampling (``sampling``) and the ``tf.data`` input (``tf_input``)."""
