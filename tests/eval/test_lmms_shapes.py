"""The offline ``tokenprune_shapes`` task definition (needs no lmms-eval)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from tokenprune.eval.lmms_eval import TASKS_DIR, shapes
from tokenprune.eval.lmms_eval.__main__ import main
from tokenprune.eval.tasks import ShapesTask


def test_shipped_docs_file_equals_the_generator() -> None:
    lines = shapes.DOCS_FILE.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == shapes.shapes_docs()
    assert len(lines) == 5 * shapes.PER_FAMILY


@pytest.mark.parametrize("k", [1, 4])
def test_first_5k_docs_are_tokenprune_eval_limit_k(k: int) -> None:
    docs = shapes.shapes_docs()[: 5 * k]
    samples = {s.id: s for s in ShapesTask().samples("test", 0, k)}
    assert sorted(d["sample_id"] for d in docs) == sorted(samples)
    for doc in docs[:5]:
        sample = samples[doc["sample_id"]]
        (image,) = shapes.doc_to_visual(doc)
        np.testing.assert_array_equal(np.asarray(image), sample.image)
        assert (shapes.doc_to_text(doc), doc["answer"]) == (sample.question, sample.answer)


def test_scoring_is_the_shapes_task_exact_match() -> None:
    doc = shapes.shapes_docs(per_family=1)[2]  # counting: "zero"
    assert shapes.process_results(doc, ["0"]) == {"exact_match": 1.0}
    assert shapes.process_results(doc, ["The answer is zero"]) == {"exact_match": 0.0}
    assert shapes.doc_to_text(doc, {"pre_prompt": "Q: ", "post_prompt": " A:"}).startswith("Q: ")


def test_task_yaml_reads_the_shipped_file_by_relative_path() -> None:
    text = (TASKS_DIR / "tokenprune_shapes" / "tokenprune_shapes.yaml").read_text()
    config = yaml.load(text.replace("!function ", ""), Loader=yaml.SafeLoader)
    assert config["task"] == "tokenprune_shapes"
    assert (TASKS_DIR / "tokenprune_shapes" / config["dataset_kwargs"]["data_files"]["test"]) == (
        shapes.DOCS_FILE
    )
    for key in ("doc_to_visual", "doc_to_text", "process_results"):
        assert hasattr(shapes, config[key].rsplit(".", 1)[1]), key


def test_main_prints_the_include_path(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert capsys.readouterr().out.strip() == str(TASKS_DIR)
    assert main(["--bad"]) == 2
