"""Studies: a study's experiments as resumable, parallel trials compared with paired statistics."""
