"""budget_minutes: the planned step count, the deadline, and a resumed run keeping its plan."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybridvit_jax.configs import vit
from hybridvit_jax.evaluate import restore_run
from hybridvit_jax.training import budget, loop
from hybridvit_jax.training.history import read_history

SPEED = budget.Speed(seconds_per_step=0.5, seconds_per_eval_batch=1.0)


def test_evaluation_count_is_every_nth_whole_epoch_before_the_end_and_the_end():
  count = lambda total, every: budget.evaluation_count(total, steps_per_epoch=10, eval_every_epochs=every)
  assert [count(total, 1) for total in (5, 10, 11, 20, 25)] == [1, 1, 2, 2, 3]
  assert [count(total, 2) for total in (20, 21, 40, 41)] == [1, 2, 2, 3]


def test_evaluations_left_leave_out_those_at_or_before_the_step():
  left = lambda total, step: budget.evaluations_left(total, step=step, steps_per_epoch=10, eval_every_epochs=2)
  assert [left(45, step) for step in (0, 19, 20, 21, 39, 40, 44)] == [3, 3, 2, 2, 2, 1, 1]


def seconds_to_deadline(total_steps: int, *, step: int, eval_batches: int) -> float:
  """The plan's work before its last evaluation, counted by hand: the steps and the evaluations
  after every 2nd epoch, then the last evaluation's reserve (1.5 times its batches, the slack)."""
  evaluations_before_last = len([end for end in range(200, total_steps, 200) if end > step])
  return ((total_steps - step) * SPEED.seconds_per_step
          + evaluations_before_last * eval_batches * SPEED.seconds_per_eval_batch)


@pytest.mark.parametrize('budget_s, elapsed_s, step, eval_batches',
                         [(600.0, 20.0, 23, 10), (1800.0, 30.0, 23, 20), (300.0, 100.0, 250, 0),
                          (900.0, 500.0, 400, 30)])
def test_plan_is_the_most_steps_whose_work_ends_before_the_deadline_less_the_margin(budget_s, elapsed_s, step, eval_batches):
  kwargs = dict(budget_s=budget_s, elapsed_s=elapsed_s, step=step, speed=SPEED, steps_per_epoch=100,
                eval_every_epochs=2, eval_batches=eval_batches)
  planned = budget.steps_in_budget(max_steps=100_000, **kwargs)
  reserve_s = 1.5 * eval_batches * SPEED.seconds_per_eval_batch + budget.DEADLINE_SLACK_S
  usable_s = (budget_s - reserve_s - elapsed_s) * (1 - budget.SAFETY_MARGIN)
  assert seconds_to_deadline(planned, step=step, eval_batches=eval_batches) <= usable_s
  assert seconds_to_deadline(planned + 1, step=step, eval_batches=eval_batches) > usable_s
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


@pytest.mark.slow
def test_budgeted_run_is_the_run_of_its_planned_steps_and_a_resumed_one_keeps_the_plan(tmp_path, monkeypatch):
  reference = tmp_path / 'thirty_steps'
  loop.train_and_evaluate(budget_config(budget_minutes=0.0, max_steps=30), reference)
  planned = []
  monkeypatch.setattr(budget, 'steps_in_budget', lambda **kwargs: planned.append(kwargs) or 30)
  workdir = tmp_path / 'budgeted'
  record = loop.train_and_evaluate(budget_config(), workdir)
  # Planned after the probe's steps, then again at the evaluation after epoch 4 (the same plan).
  assert [(plan['step'], plan['max_steps']) for plan in planned] == [(budget.PROBE_LAST_STEP, 42), (28, 42)]
  assert planned[0]['speed'].seconds_per_step > 0 and planned[0]['speed'].seconds_per_eval_batch > 0
  assert (record['step'], record['planned_steps']) == (30, 30)
  jax.tree.map(np.testing.assert_array_equal, final_params(workdir), final_params(reference))

  # Lose the last checkpoint (a crash after step 28): the rerun plans nothing and ends as before.
  (last,) = [p for p in (workdir / 'checkpoints' / 'latest').iterdir() if p.name == '30']
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.rmtree(last)
  record = loop.train_and_evaluate(budget_config(), workdir)
  assert (len(planned), record['step'], record['planned_steps']) == (2, 30, 30)
  jax.tree.map(np.testing.assert_array_equal, final_params(workdir), final_params(reference))


def test_step_timer_leaves_out_the_first_step_after_a_plan_and_the_evaluations():
  now = [100.0]
  timer = budget.StepTimer(clock=lambda: now[0])
  state = types.SimpleNamespace(step=jnp.int32(0))
  timer.after_step(state, 5)  # starts here: the step that brought the run to 5 compiled
  now[0] += 10.0
  timer.after_step(state, 15)
  timer.pause(4.0)  # an evaluation
  assert timer.seconds_per_step(15) == pytest.approx(0.6)
  assert timer.seconds_per_step(5) is None
  timer.restart()
  assert timer.seconds_per_step(15) is None


def test_plan_from_slow_first_steps_is_made_again_after_a_twentieth_of_it():
  # The probe's steps take 2 s (a heap growing), the rest 0.5 s: the second plan, made from the
  # steps since the first, is as long as a plan from 0.5 s steps, and a third comes 5% later.
  now = [0.0]
  config = budget_config(budget_minutes=30.0, eval_every_epochs=100)
  time_budget = budget.TimeBudget(
      config, start_step=0, max_total_steps=100_000, steps_per_epoch=100_000, eval_batches=1,
      session_start=0.0, time_eval_batch=lambda state: 1.0, clock=lambda: now[0], wait=lambda x: None)
  state = types.SimpleNamespace(step=jnp.int32(0))
  plans = {}
  for step in range(1, 400):
    now[0] += 2.0 if step <= budget.PROBE_LAST_STEP else 0.5
    plan = time_budget.after_step(state, step)
    if plan is not None:
      plans[step] = plan, now[0]
  first, _ = plans.pop(budget.PROBE_LAST_STEP)
  second_step = min(plans)
  assert second_step == budget.PROBE_LAST_STEP + budget.steps_between_plans(first)
  second, elapsed_s = plans[second_step]
  fitting = budget.steps_in_budget(
      budget_s=1800.0, elapsed_s=elapsed_s, step=second_step, max_steps=100_000,
      speed=budget.Speed(seconds_per_step=0.5, seconds_per_eval_batch=1.0), steps_per_epoch=100_000,
      eval_every_epochs=100, eval_batches=1)
  assert first < 1800 / 2.0 and second == fitting > 3000
  assert min(s for s in plans if s > second_step) == second_step + budget.steps_between_plans(second)


@pytest.mark.slow
def test_plan_at_an_evaluation_moves_the_end_and_a_resumed_run_keeps_it(tmp_path, monkeypatch):
  reference = tmp_path / 'thirty_five_steps'
  loop.train_and_evaluate(budget_config(budget_minutes=0.0, max_steps=35), reference)
  plans = iter([30, 35])  # the probe's plan, then the one at the evaluation after epoch 4
  monkeypatch.setattr(budget, 'steps_in_budget', lambda **kwargs: next(plans, 35))
  workdir = tmp_path / 'replanned'
  record = loop.train_and_evaluate(budget_config(), workdir)
  assert (record['step'], record['planned_steps']) == (35, 35)
  history = read_history(workdir)
  assert [(r['step'], r['planned_steps']) for r in history] == [(7, 42), (14, 42), (21, 42), (28, 35), (35, 35)]
  # Steps 0-27 are the warmup, the same for every plan; steps 28-34 decay as a 35-step run's do.
  jax.tree.map(np.testing.assert_array_equal, final_params(workdir), final_params(reference))

  # Lose the last checkpoint: the rerun resumes at step 28 with the plan of 35 steps it had there.
  first = final_params(workdir)
  (last,) = [p for p in (workdir / 'checkpoints' / 'latest').iterdir() if p.name == '35']
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.rmtree(last)
  assert loop.train_and_evaluate(budget_config(), workdir)['step'] == 35
  jax.tree.map(np.testing.assert_array_equal, final_params(workdir), first)


@pytest.mark.slow
def test_plan_at_a_periodic_checkpoint_moves_the_end_before_any_evaluation(tmp_path, monkeypatch):
  # One evaluation, at the end: a plan from slow first steps would otherwise never be corrected.
  planned = []
  plans = iter([30, 35])  # the probe's plan, then the one at the checkpoint of step 25
  monkeypatch.setattr(budget, 'steps_in_budget', lambda **kwargs: planned.append(kwargs['step']) or next(plans, 35))
  record = loop.train_and_evaluate(budget_config(eval_every_epochs=6, checkpoint_every_steps=25), tmp_path)
  assert planned == [budget.PROBE_LAST_STEP, 25]
  assert (record['step'], record['planned_steps']) == (35, 35)
  assert [(r['step'], r['planned_steps']) for r in read_history(tmp_path)] == [(35, 35)]


def test_run_ends_with_an_evaluation_at_the_deadline(tmp_path):
  record = loop.train_and_evaluate(budget_config(budget_minutes=1e-4), tmp_path)  # 6 ms: over after a step
  assert (record['step'], record['planned_steps']) == (1, 1)
  assert 0.0 <= record['val_accuracy'] <= 1.0
  assert [r['step'] for r in read_history(tmp_path)] == [1]


@pytest.mark.slow
def test_lookahead_run_cut_by_the_deadline_ends_on_its_slow_weights(tmp_path):
  config = budget_config(budget_minutes=1e-4, lookahead_decay=0.8, lookahead_every_steps=5)
  config.optimizer.warmup_epochs = 0.0  # so the one step taken moves the weights (warmup's first rate is 0)
  assert loop.train_and_evaluate(config, tmp_path)['step'] == 1  # cut before its first pull (step 5)
  state = restore_run(tmp_path, 'latest')[3]
  jax.tree.map(np.testing.assert_array_equal, (state.params, state.model_state),
               (state.slow_weights['params'], state.slow_weights['model_state']))
