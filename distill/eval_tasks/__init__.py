"""lm-evaluation-harness tasks the project builds from its own data (offline, no download)."""

from distill.eval_tasks.continuation import TASK, build_examples, read_examples, task_config, write_task

__all__ = ["TASK", "build_examples", "read_examples", "task_config", "write_task"]
