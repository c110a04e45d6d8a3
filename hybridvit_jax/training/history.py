"""A run's history: WORKDIR/history.jsonl, one JSON record per evaluation, oldest first."""
import json
import pathlib
from typing import Any

HISTORY_FILE = 'history.jsonl'


def read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
  """The JSON objects of a file with one per line, oldest first; [] when there is no file."""
  path = pathlib.Path(path)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_jsonl(path: pathlib.Path, record: dict[str, Any]) -> None:
  """Appends `record` as one line of JSON to `path`."""
  with open(path, 'a') as f:
    f.write(json.dumps(record) + '\n')


def read_history(workdir: pathlib.Path) -> list[dict[str, Any]]:
  """The run's per-epoch records, oldest first."""
  return read_jsonl(pathlib.Path(workdir) / HISTORY_FILE)


def truncate_history(workdir: pathlib.Path, last_step: int) -> None:
  """Drops records written after the checkpoint a run resumes from (their work is redone)."""
  records = [r for r in read_history(workdir) if r['step'] <= last_step]
  path = pathlib.Path(workdir) / HISTORY_FILE
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))


def append_history(workdir: pathlib.Path, record: dict[str, Any]) -> None:
  """Appends the per-epoch `record` to the run's history."""
  append_jsonl(pathlib.Path(workdir) / HISTORY_FILE, record)
