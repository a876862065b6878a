"""``lmms-eval --model tokenprune`` on the shipped toy model agrees with ``tokenprune eval``.

Skipped without the optional ``lmms`` extra. Without the shipped model's trained weights or its
language-model file the ``shipped_toy_model`` fixture skips (fails under ``CI=true``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lmms_eval", reason="needs the optional extra: pip install 'tokenprune[lmms]'")

from tokenprune.eval.lmms_eval import MODEL_NAME, TASKS_DIR
from tokenprune.eval.runner import Budget, EvalSpec, load_pipeline_spec, run_eval
from tokenprune.eval.tasks import ShapesTask
from tokenprune.plugin import Runtime

CONFIG = Path(__file__).parents[2] / "configs" / "cls_attention_topk64.yaml"
PER_FAMILY = 2  # 10 questions: lmms-eval --limit 10 == tokenprune eval --limit 2
# lmms-eval and its dependencies warn on import and while evaluating; not our warnings.
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]


def test_registered_through_the_entry_point() -> None:
    from lmms_eval.models import get_model

    from tokenprune.eval.lmms_eval.model import TokenPruneLMM

    assert get_model(MODEL_NAME) is TokenPruneLMM


@pytest.fixture(scope="module")
def lmms_run(shipped_toy_model: None) -> dict[str, Any]:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    results = simple_evaluate(
        model=MODEL_NAME,
        model_args=f"pretrained=shipped,pipeline={CONFIG}",
        tasks=["tokenprune_shapes"],
        task_manager=TaskManager("WARNING", include_path=str(TASKS_DIR)),
        limit=5 * PER_FAMILY,
        batch_size=1,
        log_samples=True,
        device="cpu",
    )
    assert results is not None
    return results  # type: ignore[no-any-return]


def test_answers_and_score_equal_tokenprune_eval(lmms_run: dict[str, Any], tmp_path: Path) -> None:
    from tokenprune.eval.models import toy_eval_model

    spec = EvalSpec(
        task=ShapesTask(),
        pipelines=[load_pipeline_spec(CONFIG, Runtime())],
        budgets=[Budget.parse("64")],  # the config's own budget
        limit=PER_FAMILY,
        batch_size=1,
    )
    summary = run_eval(toy_eval_model(), spec, tmp_path, progress=False)
    assert summary is not None
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    ours = {r["sample_id"]: r for r in records if r["pipeline"] == CONFIG.stem}
    samples = lmms_run["samples"]["tokenprune_shapes"]
    theirs = {s["doc"]["sample_id"]: s for s in samples}
    assert sorted(theirs) == sorted(ours)
    for sample_id, record in ours.items():
        assert theirs[sample_id]["filtered_resps"][0] == record["prediction"], sample_id
        assert theirs[sample_id]["exact_match"] == float(record["correct"]), sample_id
    score = lmms_run["results"]["tokenprune_shapes"]["exact_match,none"]
    row = next(r for r in summary.rows if r.pipeline == CONFIG.stem)
    assert score == pytest.approx(sum(r["correct"] for r in ours.values()) / len(ours))
    assert score == pytest.approx(row.accuracy)


def test_loglikelihood_of_the_greedy_answer_is_greedy(shipped_toy_model: None) -> None:
    from lmms_eval.api.instance import Instance

    from tokenprune.eval.lmms_eval import shapes
    from tokenprune.eval.lmms_eval.model import TokenPruneLMM

    lm = TokenPruneLMM(pretrained="shipped", pipeline=str(CONFIG), device="cpu")
    docs = shapes.shapes_docs(per_family=1)
    lm.task_dict = {"shapes": {"test": docs}}

    def request(kind: str, doc_id: int, second: Any) -> Instance:
        args = (docs[doc_id]["question"], second, shapes.doc_to_visual, doc_id, "shapes", "test")
        meta = {"task": "shapes", "doc_id": doc_id, "repeats": 1}
        return Instance(request_type=kind, arguments=args, idx=0, metadata=meta)

    greedy = {"max_new_tokens": 8, "temperature": 0, "do_sample": False}
    answers = lm.generate_until([request("generate_until", i, dict(greedy)) for i in range(3)])
    scored = lm.loglikelihood([request("loglikelihood", i, " " + a) for i, a in enumerate(answers)])
    assert all(is_greedy and logprob < 0 for logprob, is_greedy in scored), (answers, scored)
    other = lm.loglikelihood([request("loglikelihood", 0, " " + answers[0] + " tomato")])
    assert other[0][0] < scored[0][0]
    with pytest.raises(ValueError, match="temperature=0"):
        lm.generate_until([request("generate_until", 0, {"temperature": 0.7})])
