"""Keyed pseudonyms: stable, keyed, scrubbed from logged tables, texts and figure captions."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from neuroblastoma_cnn.tracking.privacy import (
    PrivacyParams,
    Pseudonymizer,
    load_or_create_key,
    pseudonym,
)

ON = PrivacyParams(pseudonymize_groups=True, log_tissue_images=False)


def test_the_key_is_created_once_and_kept(tmp_path):
    credentials = tmp_path / "local" / "credentials.yml"
    credentials.parent.mkdir()
    credentials.write_text("other: {key: 1}\n")
    key = load_or_create_key(credentials)
    assert load_or_create_key(credentials) == key and "other:" in credentials.read_text()
    assert oct(credentials.stat().st_mode)[-3:] == "600"
    assert pseudonym(key, "MRN1") == pseudonym(key, "MRN1") != pseudonym(b"other", "MRN1")


def test_tables_texts_and_figures_are_scrubbed(tmp_path):
    p = Pseudonymizer(b"k", ON, tmp_path / "group_pseudonyms.csv")
    p.learn_from(pd.DataFrame({"group": ["MRN7", "b00", "1"]}))
    frame = pd.DataFrame({"image_path": ["A/MRN7/x.png", "b001.tif"], "group": ["MRN7", "1"],
                          "n": ["1", "2"]})
    out = p.scrub_frame(frame)
    assert "MRN7" not in out.to_csv() and "b00" not in out.to_csv()
    assert out["n"].tolist() == ["1", "2"]  # numbers are never taken for ids
    assert out["group"].tolist() == [pseudonym(b"k", "MRN7"), pseudonym(b"k", "1")]

    csv = tmp_path / "image_predictions.csv"
    frame.to_csv(csv, index=False)
    (tmp_path / "out").mkdir()
    logged = p.artifact_to_log(csv, frame, tissue_images=False, folder=tmp_path / "out")
    assert "MRN7" not in logged.read_text() and "MRN7" in csv.read_text()
    figure, axis = plt.subplots()
    axis.set_title("MRN7 misclassified")
    png = tmp_path / "gallery.png"
    figure.savefig(png)
    assert p.artifact_to_log(png, figure, tissue_images=True, folder=tmp_path / "out") is None
    logged = p.artifact_to_log(png, figure, tissue_images=False, folder=tmp_path / "out")
    assert logged.exists() and axis.get_title() == "MRN7 misclassified"  # restored locally

    assert p.save_mapping() is not None and p.save_mapping() is None  # once per new name
    again = Pseudonymizer(b"k", ON, tmp_path / "group_pseudonyms.csv")
    assert set(again.groups) == {"MRN7", "b00", "1"}
