"""Trains one experiment: python launch.py --config=configs/vit.py --workdir=runs/vit

Every config key can be overridden with --config.KEY=VALUE. Multi-process (TPU pods, GPU
clusters): start the same command on every worker; JAX's runtime finds its peers on Cloud TPU
and SLURM, or takes --coordinator_address/--num_processes/--process_id.
"""
from absl import app, flags
from ml_collections import config_flags

from hybridvit_jax import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file, e.g. configs/vit.py:paper.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and history.jsonl.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-process).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process\'s index (multi-process).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  cli.run_and_exit(cli.train_main, _CONFIG.value, _WORKDIR.value, coordinator_address=_COORDINATOR.value,
                   num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)


if __name__ == '__main__':
  app.run(main, flags_parser=lambda argv: cli.parse_training_flags_or_exit(argv))
