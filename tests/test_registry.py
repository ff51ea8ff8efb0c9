"""The task registry: one registration per task, read by the config, the builder, the audit and clients."""

from __future__ import annotations

import pytest

from handlers.config import TASKS as CONFIG_TASKS
from handlers.tasks.registry import TASKS, TaskResult, get_task, task_of_body
from model_store import build


def test_every_registered_task_names_a_real_handler_file_and_class() -> None:
    for task in TASKS.values():
        assert (build.REPO_ROOT / task.handler_file).is_file(), task.handler_file
        handler = task.handler_class()
        assert handler.task is task and handler.task_options == task.options


def test_config_and_builder_read_the_registry() -> None:
    assert set(CONFIG_TASKS) == {name for name, task in TASKS.items() if task.config_task}
    assert "clip" in TASKS and "clip" not in CONFIG_TASKS  # chosen by architecture, not handler.task
    with pytest.raises(KeyError, match="registered: classifier"):
        get_task("captioning")


@pytest.mark.parametrize(
    ("body", "task", "top", "subjects"),
    [
        ({"model": "m", "predictions": [{"index": 3, "label": "cat", "score": 0.9}],
          "explanations": [{"target": 3, "label": "cat", "method": "gradcam", "layers": ["l"], "heatmap": {}}]},
         "classifier", {"index": 3, "label": "cat", "score": 0.9}, [{"target": 3, "label": "cat"}]),
        ({"detections": [{"index": 0, "class": 2, "label": "dog", "score": 0.7, "box": [1, 2, 3, 4]}],
          "explanations": [{"box_index": 0, "target": 2, "label": "dog", "box": [1, 2, 3, 4], "heatmap": {}}]},
         "detection", {"index": 2, "label": "dog", "score": 0.7}, [{"target": 0, "label": "dog", "box": [1, 2, 3, 4]}]),
        ({"mask": {"format": "png"}, "classes": [{"index": 0, "label": "bg", "pixels": 9, "fraction": 0.9}]},
         "segmentation", {"index": 0, "label": "bg", "score": 0.9}, []),
        ({"similarities": [{"concept": "red", "similarity": -0.25}],
          "explanations": [{"concept": "red", "target": "similarity", "overlay": {}}]},
         "embedding", {"index": None, "label": "red", "score": -0.25},
         [{"target": "red", "label": None, "kind": "similarity"}]),
    ],
)
def test_a_body_reads_back_as_the_typed_result(body: dict, task: str, top: dict, subjects: list) -> None:
    result = TaskResult.from_body(body)
    assert result.task == task and task_of_body(body) is get_task(task)
    assert result.top == top and result.subjects == subjects
    header = {"model": "m", "version": "1"}
    assert TaskResult.from_body(result.body(header)) == result  # serialise and read back: nothing lost
    assert {k: v for k, v in result.body(header).items() if k not in header} == {
        k: v for k, v in body.items() if k not in header
    }


def test_a_non_answer_is_refused() -> None:
    with pytest.raises(ValueError, match="not a task answer"):
        TaskResult.from_body({"code": 400, "message": "bad"})
