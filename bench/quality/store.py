"""runs.jsonl: one JSON line per finished run, appended, never rewritten. A run is identified by
task/method/config/seed; a rerun of the study skips every run already in the file, so the study
can be split by task and phase and survive interruption. Several processes may append at once
(an exclusive lock around each line)."""
import fcntl
import json
import os
from typing import Dict


def config_key(config: Dict) -> str:
    """A stable, readable name of a flat configuration: 'lr=0.003,pooling=last'."""
    if not config:
        return "-"
    return ",".join(f"{k}={config[k]!r}" if isinstance(config[k], str) else f"{k}={config[k]}"
                    for k in sorted(config))


def run_id(task: str, method: str, config: Dict, seed: int) -> str:
    return f"{task}/{method}/{config_key(config)}/seed{seed}"


class RunStore:
    def __init__(self, path: str, fingerprints: Dict[str, str]):
        """fingerprints: task -> a digest of everything that makes runs comparable (model,
        data, budget). A finished run recorded under other settings is an error, not a skip."""
        self.path = path
        self.fingerprints = fingerprints

    def load(self) -> Dict[str, dict]:
        runs = {}
        if not os.path.exists(self.path):
            return runs
        with open(self.path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{self.path}:{n}: not a JSON line ({exc})") from exc
                want = self.fingerprints.get(rec["task"])
                if want is not None and rec.get("fingerprint") != want:
                    raise ValueError(
                        f"{self.path}:{n}: run {rec['run_id']} was made with other settings "
                        f"(fingerprint {rec.get('fingerprint')} != {want}); use another --out")
                runs[rec["run_id"]] = rec
        return runs

    def append(self, record: Dict) -> None:
        line = json.dumps(record) + "\n"
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
