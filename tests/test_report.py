"""The report page and the tables `pipeline run` ends with, from outputs written by hand (no step runs): what a
reader of ``report.html`` and of the terminal sees."""

from __future__ import annotations

from pipeline.manifest.report import _chosen_keys


def test_sheet_ranks_count_from_the_best():
    """1st is the best: the sheets between the worst and the best say how far from the best they are."""
    doc = {"per_image": [{"key": f"img{i:02d}", "cc": i / 100} for i in range(12)]}  # img11 the best
    assert _chosen_keys(doc, 4) == {"img00": "worst of 12", "img04": "8th best of 12", "img07": "5th best of 12",
                                    "img11": "best of 12"}
    assert _chosen_keys({"per_image": [{"key": "a", "cc": 0.5}, {"key": "b", "cc": 0.7}, {"key": "c", "cc": 0.6}]},
                        4) == {"a": "worst of 3", "c": "2nd best of 3", "b": "best of 3"}
