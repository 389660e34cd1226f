"""neuroblastoma-cnn: Kedro pipelines for CNN grading of H&E histology images."""

from neuroblastoma_cnn.runtime.parallel import install_thread_defaults as _install_threads
from neuroblastoma_cnn.runtime.quiet import install as _install_quiet_output

__version__ = "0.1.0"

# Before TensorFlow, Keras or MLflow are imported by anything in this process: see quiet.py.
_install_quiet_output()
# Before scikit-learn loads OpenMP: threads that sleep between parallel regions (parallel.py).
_install_threads()
