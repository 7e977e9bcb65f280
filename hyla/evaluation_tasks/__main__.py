"""`python -m hyla.evaluation_tasks` prints the tasks' folder, for lm_eval's --include_path."""

from hyla.evaluation_tasks import TASKS_DIR

print(TASKS_DIR)
