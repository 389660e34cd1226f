"""The predict command run in-process (tests, notebooks) leaves the caller's logging as it was:
it once left this package's logger at WARNING, which silenced every later INFO record."""

from __future__ import annotations

import logging

from neuroblastoma_cnn.cli.commands import main


def test_predict_in_process_restores_the_callers_logging(tmp_path, caplog):
    package = logging.getLogger("neuroblastoma_cnn")
    root = logging.getLogger()
    before = (package.level, logging.getLogger("neuroblastoma_cnn.pipelines.predict").level,
              root.level, root.handlers[:])
    code = main(["predict", str(tmp_path / "missing.png"), "--quiet"])
    assert code == 2  # a usage error, raised inside the command's logging set-up
    after = (package.level, logging.getLogger("neuroblastoma_cnn.pipelines.predict").level,
             root.level, root.handlers[:])
    assert after == before
    with caplog.at_level(logging.INFO):
        logging.getLogger("neuroblastoma_cnn.ingestion").info("still heard")
    assert "still heard" in caplog.text
