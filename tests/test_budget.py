"""budget_minutes: the planned step count, the deadline, and a resumed run keeping its plan."""
import jax
import numpy as np
import pytest

from configs import vit
from hybridvit_jax.evaluate import restore_run
from hybridvit_jax.training import budget, loop

SPEED = budget.Speed(seconds_per_step=0.5, seconds_per_eval_batch=1.0, compile_seconds=10.0)


def test_evaluation_count_is_every_nth_whole_epoch_before_the_end_and_the_end():
  count = lambda total, every: budget.evaluation_count(total, steps_per_epoch=10, eval_every_epochs=every)
  assert [count(total, 1) for total in (5, 10, 11, 20, 25)] == [1, 1, 2, 2, 3]
  assert [count(total, 2) for total in (20, 21, 40, 41)] == [1, 2, 2, 3]


def seconds_of_plan(total_steps: int, *, step: int, eval_batches: int) -> float:
  evaluations = budget.evaluation_count(total_steps, steps_per_epoch=100, eval_every_epochs=2)
  return ((total_steps - step) * SPEED.seconds_per_step + evaluations * eval_batches * SPEED.seconds_per_eval_batch
          + SPEED.compile_seconds)


@pytest.mark.parametrize('budget_s, elapsed_s, step, eval_batches',
                         [(600.0, 20.0, 23, 10), (1800.0, 30.0, 23, 20), (300.0, 100.0, 250, 0)])
def test_plan_is_the_most_steps_whose_work_fits_the_time_left_less_the_margin(budget_s, elapsed_s, step, eval_batches):
  kwargs = dict(budget_s=budget_s, elapsed_s=elapsed_s, step=step, speed=SPEED, steps_per_epoch=100,
                eval_every_epochs=2, eval_batches=eval_batches)
  planned = budget.steps_in_budget(max_steps=100_000, **kwargs)
  usable_s = (budget_s - elapsed_s) * (1 - budget.SAFETY_MARGIN)
  assert seconds_of_plan(planned, step=step, eval_batches=eval_batches) <= usable_s
  assert seconds_of_plan(planned + 1, step=step, eval_batches=eval_batches) > usable_s
  assert budget.steps_in_budget(max_steps=planned - 7, **kwargs) == planned - 7  # never past the cap
  # Spent already: still one more step, so the run ends with an evaluation.
  assert budget.steps_in_budget(max_steps=100_000, **{**kwargs, 'elapsed_s': budget_s}) == step + 1


def budget_config(**overrides):
  config = vit.get_config('smoke')  # 7 steps an epoch
  config.update({'num_epochs': 6, 'eval_test_every_epoch': False, 'budget_minutes': 60.0, **overrides})
  config.optimizer.warmup_epochs = 4.0  # 28 steps: the probe's 23 take the same learning rates whatever the plan
  return config


def final_params(workdir):
  return jax.device_get(restore_run(workdir, 'latest')[3].params)


def test_budgeted_run_is_the_run_of_its_planned_steps_and_a_resumed_one_keeps_the_plan(tmp_path, monkeypatch):
  reference = tmp_path / 'thirty_steps'
  loop.train_and_evaluate(budget_config(budget_minutes=0.0, max_steps=30), reference)
  planned = []
  monkeypatch.setattr(budget, 'steps_in_budget', lambda **kwargs: planned.append(kwargs) or 30)
  workdir = tmp_path / 'budgeted'
  record = loop.train_and_evaluate(budget_config(), workdir)
  assert (len(planned), planned[0]['step'], planned[0]['max_steps']) == (1, budget.PROBE_LAST_STEP, 42)
  assert 0 < planned[0]['speed'].seconds_per_step < planned[0]['speed'].compile_seconds
  assert (record['step'], record['planned_steps']) == (30, 30)
  jax.tree.map(np.testing.assert_array_equal, final_params(workdir), final_params(reference))

  # Lose the last checkpoint (a crash after step 28): the rerun plans nothing and ends as before.
  (last,) = [p for p in (workdir / 'checkpoints' / 'latest').iterdir() if p.name == '30']
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.rmtree(last)
  record = loop.train_and_evaluate(budget_config(), workdir)
  assert (len(planned), record['step'], record['planned_steps']) == (1, 30, 30)
  jax.tree.map(np.testing.assert_array_equal, final_params(workdir), final_params(reference))


def test_run_ends_with_an_evaluation_at_the_deadline(tmp_path):
  record = loop.train_and_evaluate(budget_config(budget_minutes=1e-4), tmp_path)  # 6 ms: over after a step
  assert (record['step'], record['planned_steps']) == (1, 1)
  assert 0.0 <= record['val_accuracy'] <= 1.0
  assert [r['step'] for r in loop.read_history(tmp_path)] == [1]
