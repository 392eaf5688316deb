"""runs.jsonl: one JSON line per finished run, appended, never rewritten. A run is identified by
task/method/config/seed and the revision of the method's training recipe (the field "recipe",
1 when absent); a rerun of the study skips every run of the current revision already in the
file (one of an earlier revision is run again, under its own id), so the study can be split by
task and phase and survive interruption. Several processes may append at once
(an exclusive lock around each line) and share the work (Claims).

A run's platform is the arithmetic of the base model's GEMMs it was made with (the record's
"base_gemm": bf16 in hardware, or bf16 emulated around fp32 GEMMs). Two platforms sum in a
different order, and over a training run that moves a result as much as the effects the study
measures, so the same run made on two platforms is two records (keyed by run id, suffixed
'@<platform>' off the native platform), and paired differences compare runs of one platform
only. Runs recorded before the field existed were all made with native bf16 GEMMs (CPUs with
AVX512-BF16)."""
import fcntl
import json
import os
from typing import Dict, Optional


def config_key(config: Dict) -> str:
    """A stable, readable name of a flat configuration: 'lr=0.003,pooling=last'."""
    if not config:
        return "-"
    return ",".join(f"{k}={config[k]!r}" if isinstance(config[k], str) else f"{k}={config[k]}"
                    for k in sorted(config))


NATIVE = "bf16 native"


def platform(record: Dict) -> str:
    """The platform of a record (or of a Study's run_info)."""
    return record.get("base_gemm") or NATIVE


def record_key(rid: str, on: str) -> str:
    """The key of run `rid` made on platform `on` in RunStore.load()."""
    return rid if on == NATIVE else f"{rid}@{on}"


def run_id(task: str, method: str, config: Dict, seed: int, revision: int = 1) -> str:
    """Revision 1 has no suffix, so the ids of runs made before revisions existed stay valid."""
    rid = f"{task}/{method}/{config_key(config)}/seed{seed}"
    return rid if revision == 1 else f"{rid}/rev{revision}"


class RunStore:
    def __init__(self, path: str, fingerprints: Dict[str, str]):
        """fingerprints: task -> a digest of everything that makes runs comparable (model,
        data, budget). A finished run recorded under other settings is an error, not a skip."""
        self.path = path
        self.fingerprints = fingerprints

    def load(self) -> Dict[str, dict]:
        """{record_key: record}, in the order of the file."""
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
                runs[record_key(rec["run_id"], platform(rec))] = rec
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


class Claims:
    """One file per run in progress (claims/<run id>.pid, created exclusively), so that several
    workers started with the same arguments share the runs instead of repeating them. A claim
    whose process is gone (an interrupted worker) is taken over."""

    def __init__(self, folder: str):
        self.folder = folder

    def _path(self, rid: str) -> str:
        return os.path.join(self.folder, rid.replace("/", "__") + ".pid")

    def acquire(self, rid: str) -> Optional[int]:
        """None when this process now holds the claim, else the pid of the live holder."""
        os.makedirs(self.folder, exist_ok=True)
        path = self._path(rid)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self._holder(path)
                if holder is not None and holder != os.getpid() and _alive(holder):
                    return holder
                _remove(path)  # stale: its process ended without releasing it
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return None
        return self._holder(path) or -1

    def release(self, rid: str) -> None:
        _remove(self._path(rid))

    def active(self) -> bool:
        """Whether any live process holds a claim."""
        if not os.path.isdir(self.folder):
            return False
        for name in os.listdir(self.folder):
            holder = self._holder(os.path.join(self.folder, name))
            if holder is not None and holder != os.getpid() and _alive(holder):
                return True
        return False

    @staticmethod
    def _holder(path: str) -> Optional[int]:
        try:
            with open(path) as f:
                return int(f.read().strip() or 0) or None
        except (OSError, ValueError):
            return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
