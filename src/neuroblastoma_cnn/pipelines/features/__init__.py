"""CNN features with scikit-learn heads (the study's third technique)."""
